"""`sdtrain train <method>`: plan the data, load the model, build the method, run the engine."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.config.loader import LoadedConfig
from sdtrain.errors import ConfigError, Problem, TrainingError

if TYPE_CHECKING:
    from sdtrain.data.plan import Plan
    from sdtrain.engine.distributed import Processes
    from sdtrain.engine.loop import TrainResult
    from sdtrain.models.bundle import ModelBundle

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated run that has not loaded any weights yet (what --dry-run shows)."""

    loaded: LoadedConfig
    command: str
    plan: Plan
    seed: int
    resume_folder: Path | None
    state_config: dict[str, Any]  # what a state records: the resolved config + data fingerprint


def _require(loaded: LoadedConfig) -> None:
    cfg = loaded.config
    problems = []
    if not cfg.model.pretrained_model_name_or_path:
        problems.append(
            Problem(
                key="model.pretrained_model_name_or_path",
                file=_file(loaded),
                message="no base model given",
                hint="a .safetensors/.ckpt file, a diffusers folder, a hub id, "
                "or builtin:toy-sd1 to try sdtrain",
            )
        )
    if not cfg.training.output_dir:
        problems.append(
            Problem(
                key="training.output_dir",
                file=_file(loaded),
                message="no output folder given",
                hint="set [training] output_dir (or --output_dir DIR)",
            )
        )
    if problems:
        raise ConfigError(problems)


def _file(loaded: LoadedConfig) -> str | None:
    return str(loaded.source.path) if loaded.source else None


def prepare(loaded: LoadedConfig, command: str, write_caches: bool = False) -> Prepared:
    """Validate everything that needs no weights: required keys, the dataset plan, the seed,
    the prompt file, the state to resume from and its config differences."""
    from sdtrain.config.resolved import resolved_dict
    from sdtrain.data.pixels import verifying_pixels
    from sdtrain.data.plan import plan_for_run
    from sdtrain.engine.fused_backward import check_fused_backward
    from sdtrain.engine.resume import check_resume_config, data_fingerprint, resolve_resume
    from sdtrain.launch import is_main_process
    from sdtrain.run.full_checks import check_full_model_run
    from sdtrain.run.lock import check_run_folder_free

    _require(loaded)
    cfg = loaded.config
    main = is_main_process()
    if main:  # the main process takes the lock; a worker checking would find its own run
        check_run_folder_free(Path(str(cfg.training.output_dir)))  # before reading its states
    try:
        check_fused_backward(cfg.optimizer, cfg.training)
    except ConfigError as err:  # point at the line that switched it on
        raise _at_lines(loaded, err) from None
    _check_zero(loaded, command)
    with verifying_pixels():  # decode every image once: broken pixel data is found here
        plan = plan_for_run(loaded, write_caches=write_caches and main)  # cache_info size caches
    from sdtrain.import_gc import quiet_gc

    with quiet_gc():  # the checks import torch (import_gc.py)
        import sdtrain.models.builtin  # noqa: F401
        from sdtrain.run.checks import check_before_load
    check_before_load(loaded, plan)
    check_full_model_run(loaded, command, plan)
    plan.require_valid()  # invalid images / nothing to train: the dry run says so too
    class_images = _class_image_plan(loaded, command)
    if class_images is not None:
        plan.notes.append(class_images.describe())
    resume_folder = resolve_resume(cfg.saving, Path(str(cfg.training.output_dir)))
    seed = cfg.training.seed
    if seed is None and resume_folder is not None:
        from sdtrain.engine.state import load_counters

        seed = load_counters(resume_folder).seed
    if seed is None:
        seed = random.SystemRandom().randint(0, 2**31 - 1)
        logger.info("no seed given: using seed %d (recorded in the run's config)", seed)
    cfg.training.seed = seed
    if cfg.sample.sample_prompts:
        from sdtrain.engine.sampling import load_prompts

        load_prompts(cfg.sample, 512)  # parse now: a bad prompt file fails before training
    state_config: dict[str, Any] = resolved_dict(cfg)
    if plan.steps is not None:
        state_config["data"] = data_fingerprint(plan.datasets, plan.steps.batches_per_epoch)
    if resume_folder is not None:
        from sdtrain.engine.state import load_state_config, verify_state

        problem = verify_state(resume_folder) if resume_folder.is_dir() else "not found"
        if problem:
            raise TrainingError(
                f"cannot resume from {resume_folder}: {problem}",
                hint='check the path, or use resume = "auto" to pick the newest complete state',
            )
        _check_process_count(resume_folder, plan.facts.num_processes)
        check_resume_config(
            load_state_config(resume_folder), state_config, cfg.saving.resume_allow_changes
        )
    return Prepared(loaded, command, plan, seed, resume_folder, state_config)


def _class_image_plan(loaded: LoadedConfig, command: str) -> Any:
    """DreamBooth class images to generate before training (None for other runs)."""
    if command != "dreambooth":
        return None
    from sdtrain.tools.class_images import plan_class_images

    return plan_class_images(loaded.config.dreambooth)  # type: ignore[attr-defined]


def _fill_class_images(
    prepared: Prepared, bundle: ModelBundle, processes: Processes, plan: Any
) -> None:
    """Generate `plan`'s missing class images (`_class_image_plan`) with the loaded base model,
    then re-plan the data.

    The main process generates and writes them; the others wait, then find every image
    present (nothing left to generate) and re-plan without writing size caches."""
    from sdtrain.data.plan import plan_for_run
    from sdtrain.engine.resume import data_fingerprint
    from sdtrain.tools.class_images import fill_class_images

    if plan is None or not plan.indices:
        return
    cfg = prepared.loaded.config
    section = cfg.dreambooth  # type: ignore[attr-defined]
    with processes.main_first() as main:
        if main:
            fill_class_images(bundle, section, plan, cfg.model.clip_skip)
    prepared.plan = plan_for_run(prepared.loaded, write_caches=processes.is_main)
    prepared.plan.require_valid()
    steps = prepared.plan.steps
    if steps is not None:
        prepared.state_config["data"] = data_fingerprint(
            prepared.plan.datasets, steps.batches_per_epoch
        )


def _check_zero(loaded: LoadedConfig, command: str) -> None:
    """Under DeepSpeed (from the accelerate config): ConfigError, each problem at its key's
    file and line, for settings ZeRO cannot train with (engine/zero.py)."""
    from sdtrain.engine.zero import (
        check_zero_plugin,
        check_zero_settings,
        plugin_config_from_env,
        zero_requested,
    )

    if not zero_requested():
        return
    cfg = loaded.config
    section = getattr(cfg, command, None)
    stop = getattr(section, "stop_text_encoder_training", None)
    trains_te = bool(getattr(section, "train_text_encoder", False))
    try:
        check_zero_settings(
            command,
            cfg.optimizer,
            cfg.training,
            stop if stop is not None and stop >= 0 else None,
            cfg.model.clip_skip if trains_te else None,
        )
        check_zero_plugin(plugin_config_from_env())
    except ConfigError as err:
        raise _at_lines(loaded, err) from None


def _at_lines(loaded: LoadedConfig, err: ConfigError) -> ConfigError:
    """`err` with each problem keyed `table.key` of the run config located at its file and line
    (problems about the accelerate/DeepSpeed config stay as they are)."""
    from sdtrain.run.full_checks import located

    problems = []
    for p in err.problems:
        table, _, key = p.key.partition(".")
        in_run = key and getattr(loaded.config, table, None) is not None
        problems.append(located(loaded, table, key, p.message, p.hint) if in_run else p)
    return ConfigError(problems)


def _check_process_count(folder: Path, processes: int) -> None:
    """Refuse to resume a state on another process count: the global batch (train_batch_size
    x processes) and with it every epoch's batches and step count would change."""
    from sdtrain.engine.state import load_counters

    saved = load_counters(folder).num_processes
    if saved != processes:
        raise TrainingError(
            f"the state {folder} was written by a run on {saved} process(es); this run has "
            f"{processes}",
            hint=f"resume it with {saved} process(es) (the global batch is train_batch_size x "
            "processes, so another count trains on other batches), or start a new run",
        )


# "1": keep a half model file's frozen weights half in fp32 LoRA runs (opt-in: measured 0.70x
# peak RSS but +26 % CPU time per step on SD1.5, so not the default; README "Speed")
FROZEN_HALF_ENV = "SDTRAIN_FROZEN_HALF"


def _keep_half(cfg: Any, method: Any, precision: Any) -> bool:
    """Keep a float16/bf16 file's frozen weights half in fp32 training (engine/halfweights.py).

    Only without autocast (with it, frozen weights live in the compute dtype anyway), for
    methods that declare it safe (their export never reads the frozen base), and without
    sampling during training (diffusers' pipelines pick their dtype from the UNet's weights).
    """
    return (
        not precision.autocast
        and bool(getattr(method, "frozen_half_ok", False))
        and not cfg.sample.sample_prompts
        and os.environ.get(FROZEN_HALF_ENV) == "1"
    )


def _part_dtypes(method: Any, precision: Any) -> dict[str, Any]:
    """Frozen model parts to load straight in the dtype the engine casts them to under mixed
    precision, so that their fp32 copy never exists (SD1.5's U-Net: 3.2 GiB at the load peak).

    A method lists the parts nothing reads in fp32 before that cast (`compute_dtype_parts`):
    frozen bases (LoRA creates its adapters in fp32 whatever the base's dtype), not trained
    weights, nor the VAE where class images are drawn first. The values are identical: a half
    cast goes through fp32.
    """
    if not precision.autocast:
        return {}
    parts = getattr(method, "compute_dtype_parts", ())
    return {part: precision.vae if part == "vae" else precision.weight for part in parts}


def _half_token_embedding(method: Any, precision: Any) -> bool:
    """Whether the text encoders' token embeddings may be held half (models/half_embedding.py):
    fp32 training without autocast, for methods whose token embedding never trains
    (`half_token_embedding_ok`; not TI, which adds rows, nor text-encoder fine-tuning)."""
    return not precision.autocast and bool(getattr(method, "half_token_embedding_ok", False))


def execute(prepared: Prepared, resume_hint: str) -> TrainResult:
    """Hold the output folder's run lock (one run per folder), then load the model and train."""
    from sdtrain.run.lock import hold_run_folder

    with hold_run_folder(Path(str(prepared.loaded.config.training.output_dir))):
        return _execute(prepared, resume_hint)


def _execute(prepared: Prepared, resume_hint: str) -> TrainResult:
    """Load the model and train. Writes the resolved config into the output folder first."""
    from sdtrain.import_gc import quiet_gc

    with quiet_gc():  # torch and diffusers come with these (import_gc.py)
        import torch

        from sdtrain.atomic import write_text
        from sdtrain.config.resolved import resolved_dict, resolved_toml, shareable_toml
        from sdtrain.engine.distributed import Processes, device_of, make_accelerator
        from sdtrain.engine.loop import EngineSections, Hooks, Trainer
        from sdtrain.engine.metrics import Trackers
        from sdtrain.engine.precision import precision_for
        from sdtrain.engine.sampling import SampleHook, load_prompts
        from sdtrain.engine.state import load_state
        from sdtrain.methods.adapters.metadata import training_metadata
        from sdtrain.models.clip_mlp import use_recomputing_mlp
        from sdtrain.models.geglu import use_recomputing_geglu
        from sdtrain.models.half_embedding import keep_token_embedding_half
        from sdtrain.models.load import import_model_stack, load_bundle
        from sdtrain.models.training_kernels import use_training_kernels
        from sdtrain.run.facts import collect_facts
        from sdtrain.run.train_data import free_vae, training_data

    cfg = prepared.loaded.config
    prepared.plan.require_valid()
    output_dir = Path(str(cfg.training.output_dir))
    current = resolved_dict(cfg)
    steps = prepared.plan.steps
    assert steps is not None
    state_config = prepared.state_config
    state = load_state(prepared.resume_folder) if prepared.resume_folder is not None else None
    from sdtrain.methods.registry import METHODS

    method = METHODS[prepared.command].build(cfg, prepared.plan)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        precision = precision_for(cfg.training, cfg.model.no_half_vae, device_type)
    except ConfigError as err:
        raise _at_lines(prepared.loaded, err) from None
    # clip_skip > 1: the text encoder's last layers (and their LoRA) get no gradient
    accelerator = make_accelerator(cfg.training.mixed_precision, (cfg.model.clip_skip or 1) > 1)
    processes = Processes(accelerator)
    if processes.count != prepared.plan.facts.num_processes:
        raise TrainingError(
            f"accelerate started {processes.count} processes but the environment says "
            f"WORLD_SIZE={prepared.plan.facts.num_processes}",
            hint="start sdtrain through torchrun or accelerate launch only",
        )
    from sdtrain.engine.compile import preflight

    try:
        preflight(cfg.training, device_type, accelerator.distributed_type.name == "DEEPSPEED")
    except ConfigError as err:
        raise _at_lines(prepared.loaded, err) from None
    if precision.mixed_precision == "bf16" and device_type == "cpu":
        from sdtrain.engine.cpu_bf16 import warn_if_emulated

        warn_if_emulated()
    early: dict[str, Any] = {}  # the dataset, when its latents were cached during the load
    vae_needed = bool(load_prompts(cfg.sample, 512)) or getattr(method, "export_needs_vae", True)

    def cache_first(vae: Any) -> None:
        early["data"] = training_data(prepared, vae, precision.vae, processes)
        free_vae(vae, early["data"][0], vae_needed, processes.is_main, output_dir)

    # class images to generate need the whole model first, and their latents after that
    class_images = _class_image_plan(prepared.loaded, prepared.command)
    latents_first = cfg.training.cache_latents and not (class_images and class_images.indices)
    with quiet_gc():  # the rest of the model stack (peft, transformers), after the checks above
        import_model_stack()
    bundle = load_bundle(
        cfg.model,
        device=device_of(accelerator),
        keep_half=_keep_half(cfg, method, precision),
        part_dtypes=_part_dtypes(method, precision),
        with_vae=cache_first if latents_first else None,
    )
    _fill_class_images(prepared, bundle, processes, class_images)
    use_training_kernels(bundle)  # training only: generate keeps torch's kernels
    use_recomputing_geglu(bundle.unet)
    for encoder in bundle.family.text_encoders(bundle):
        use_recomputing_mlp(encoder)
    if _half_token_embedding(method, precision):
        for encoder in bundle.family.text_encoders(bundle):
            keep_token_embedding_half(encoder)  # when its values are exact in half precision
    steps = prepared.plan.steps
    assert steps is not None
    text = resolved_toml(cfg)
    if processes.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(output_dir / "config.toml", text)
    data, held_out = (
        early["data"]
        if "data" in early
        else training_data(prepared, bundle.vae, precision.vae, processes)
    )
    trackers = (
        Trackers(cfg.logging, f"sdtrain-{prepared.command}", current)
        if (cfg.logging.log_with or cfg.logging.logging_dir) and processes.is_main
        else None
    )
    prompts = load_prompts(cfg.sample, bundle.family.resolution)
    sampler = (
        SampleHook(
            cfg.sample,
            prompts,
            bundle,
            method,
            output_dir,
            cfg.training.output_name,
            cfg.model.clip_skip,
            cfg.model.max_token_length,
            precision.weight,
            trackers,
        )
        if prompts
        else None
    )
    if cfg.training.cache_latents and "data" not in early:
        free_vae(bundle.vae, data, vae_needed, processes.is_main, output_dir)
    holder: dict[str, Any] = {}

    def metadata(step: int, epoch: int) -> dict[str, str]:
        if "facts" not in holder:
            holder["facts"] = collect_facts(
                cfg,
                prepared.plan,
                bundle,
                trainer.built.description,
                shareable_toml(cfg, cfg.saving.metadata_full_paths),
                from_blueprint=_from_blueprint(cfg),
            )
        return training_metadata(holder["facts"], step, epoch)

    validator = _validator(prepared, output_dir, state, data.store, held_out)
    sections = EngineSections(cfg.training, cfg.optimizer, cfg.saving, cfg.logging)
    trainer = Trainer(
        method,
        bundle,
        data,
        steps,
        sections,
        output_dir,
        cfg.training.output_name,
        prepared.seed,
        state_config,
        Hooks(sample=sampler, save_metadata=metadata, validate=validator),
        resume=state,
        resume_hint=resume_hint,
        no_half_vae=cfg.model.no_half_vae,
        trackers=trackers,
        accelerator=accelerator,
    )
    try:
        result = trainer.run()
        processes.wait()  # every process is past its last collective before the group goes
        return result
    finally:
        processes.close()


def _validator(
    prepared: Prepared, output_dir: Path, state: Any, store: Any, held_out: dict | None
) -> Any:
    """The validation hook when a dataset holds out a split (validation_split), else None."""
    if not any(d.validation for d in prepared.plan.datasets):
        return None
    from sdtrain.engine.validation import Validator

    resumed = state.counters.global_step if state is not None else None
    return Validator(
        prepared.plan.datasets,
        prepared.seed,
        prepared.loaded.config.training,
        output_dir,
        resumed,
        store if held_out is not None else None,
        held_out,
    )


def _from_blueprint(cfg: Any) -> bool:
    return bool(cfg.dataset.dataset_config or cfg.general is not None or cfg.datasets is not None)
