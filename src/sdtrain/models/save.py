"""Save a bundle as an original single file (.safetensors/.ckpt) or diffusers folder, atomically."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from sdtrain.atomic import save_safetensors, save_torch
from sdtrain.errors import ConfigError, ModelLoadError, Problem
from sdtrain.models.bundle import ModelBundle
from sdtrain.models.ldm_keys import OPENCLIP_PREFIX, components_to_ldm, openclip_extra_keys
from sdtrain.models.modelspec import modelspec_metadata

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {
    "float": torch.float32,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
CONFIG_KEY = "sdtrain_config"


def resolve_precision(name: str | None) -> torch.dtype | None:
    """float / fp16 / bf16 -> torch dtype; None keeps each tensor's dtype."""
    if name is None:
        return None
    if name not in PRECISIONS:
        valid = ", ".join(PRECISIONS)
        raise ConfigError(
            [Problem(key="save_precision", message=f"unknown precision {name!r}; valid: {valid}")]
        )
    return PRECISIONS[name]


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(device="cpu", dtype=dtype)
        else:
            value = value.to("cpu")
        out[key] = value
    return out


def _check_no_adapters(bundle: ModelBundle) -> None:
    for name in ("unet", "text_encoder"):
        module = getattr(bundle, name)
        if any(".base_layer." in key or "lora_" in key for key in module.state_dict()):
            raise ModelLoadError(
                f"the {name} still has adapter layers; a full checkpoint needs plain weights",
                hint="merge the adapter into the weights (merge_and_unload) or export the adapter "
                "on its own",
            )


def source_openclip_extras(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The SD2 source file's own extra OpenCLIP tensors (last layer, projection, logit scale)."""
    source = bundle.source
    if bundle.family.name != "sd2" or source.kind != "single_file" or not source.path:
        return {}
    if not Path(source.path).is_file():
        return {}
    from sdtrain.models.checkpoint_file import CheckpointFile

    try:
        reader = CheckpointFile(source.path)
        layers = int(bundle.text_encoder.config.num_hidden_layers)
        wanted = openclip_extra_keys(reader.keys(), layers) & set(reader.keys())
        extras = reader.get(sorted(wanted))
        reader.close()
    except ModelLoadError as error:
        log.warning("not carrying SD2 extras from %s: %s", source.path, error.message)
        return {}
    return {key: value for key, value in extras.items() if key.startswith(OPENCLIP_PREFIX)}


def ldm_state_dict(bundle: ModelBundle, precision: str | None = None) -> dict[str, torch.Tensor]:
    """The bundle as one original-layout (LDM) state dict on the CPU, cast to `precision`."""
    _check_no_adapters(bundle)
    try:
        state = components_to_ldm(
            bundle.family.name,
            bundle.unet,
            bundle.vae,
            bundle.text_encoder,
            source_openclip_extras(bundle),
        )
    except KeyError as error:
        raise ModelLoadError(str(error.args[0]), hint="save plain SD 1.x/2.x weights") from error
    return _cast(state, resolve_precision(precision))


def source_extra_tensors(bundle: ModelBundle, written: set[str]) -> dict[str, torch.Tensor]:
    """Tensors of the single source file that `written` does not replace (EMA copies, ...).

    The reference saves a model trained from a single file by updating the source's own state
    dict, so such keys survive in the output; they are read memory-mapped and written unchanged
    (in their own dtype: save_precision applies to the trained weights only).
    """
    source = bundle.source
    if source.kind != "single_file" or not source.path or not Path(source.path).is_file():
        return {}
    from sdtrain.models.checkpoint_file import CheckpointFile

    reader = CheckpointFile(source.path)
    try:
        extra = sorted(set(reader.keys()) - written)
        tensors = reader.get(extra) if extra else {}
    finally:
        reader.close()
    if extra:
        log.info("keeping %d extra tensors of %s (e.g. %s)", len(extra), source.path, extra[0])
    return {key: value.contiguous() for key, value in tensors.items()}


def source_counters(bundle: ModelBundle) -> tuple[int, int]:
    """(epoch, global_step) recorded in a .ckpt source file, else (0, 0)."""
    source = bundle.source
    if source.kind != "single_file" or not source.path:
        return 0, 0
    if Path(source.path).suffix.lower() not in (".ckpt", ".pt", ".pth"):
        return 0, 0
    from sdtrain.models.checkpoint_file import CheckpointFile

    reader = CheckpointFile(source.path)
    extras = dict(reader.extras)
    reader.close()

    def number(key: str) -> int:
        value = extras.get(key)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0

    return number("epoch"), number("global_step")


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ModelLoadError(
            f"{path} already exists", hint="choose another output name or allow overwriting"
        )


def save_single_file(
    bundle: ModelBundle,
    path: str | Path,
    *,
    precision: str | None = None,
    metadata: Mapping[str, str] | None = None,
    config_text: str | None = None,
    title: str | None = None,
    clip_skip: int | None = None,
    epoch: int = 0,
    global_step: int = 0,
    overwrite: bool = False,
    keep_source_keys: bool = False,
) -> Path:
    """Write `bundle` as an original-layout single file, atomically; returns the path.

    `.safetensors`: the state dict plus string metadata = modelspec keys (architecture, title,
    resolution, prediction type, ...; §9.3) updated by `metadata`, and the caller's resolved
    config under `sdtrain_config`. `.ckpt` / `.pt`: `{"state_dict", "epoch", "global_step"}`,
    loadable with weights_only=True (tensors and ints only, no pickled objects); with
    `keep_source_keys` the epoch / global_step of a .ckpt source are added, as the reference does.
    `keep_source_keys` (training saves, as the reference): every tensor of the single source file
    that the model does not write (EMA copies, ...) is carried over unchanged. Without it (model
    conversion) only the model's own tensors are written; SD2's extra OpenCLIP tensors always are.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"cannot tell the format of {path.name}",
            hint=f"use one of {', '.join(SINGLE_FILE_SUFFIXES)}, or save as a diffusers folder",
        )
    _refuse_overwrite(path, overwrite)
    state = ldm_state_dict(bundle, precision)
    if keep_source_keys:
        state.update(source_extra_tensors(bundle, set(state)))
        base_epoch, base_step = source_counters(bundle)
        epoch, global_step = epoch + base_epoch, global_step + base_step
    if suffix == ".safetensors":
        meta = modelspec_metadata(bundle.family, title=title or path.stem, clip_skip=clip_skip)
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        if config_text is not None:
            meta[CONFIG_KEY] = config_text
        save_safetensors(path, state, metadata=meta)
    else:
        save_torch(path, {"state_dict": state, "epoch": epoch, "global_step": global_step})
    log.info("saved %s (%d tensors)", path, len(state))
    return path


def _write_weights(folder: Path, stem_safe: str, stem_bin: str, state: dict, safe: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if safe:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(folder / stem_safe), {"format": "pt"}
        )
    else:
        torch.save(state, folder / stem_bin)


def _model_index(scheduler_class: str) -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_folder(bundle: ModelBundle, tmp: Path, safe: bool, dtype: torch.dtype | None) -> None:
    from diffusers import DDIMScheduler

    for name in ("unet", "vae"):
        module = getattr(bundle, name)
        module.save_config(tmp / name)
        _write_weights(
            tmp / name,
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
            _cast(module.state_dict(), dtype),
            safe,
        )
    # transformers >= 5.6 writes CLIPTextModel keys without `text_model.`; older transformers
    # (and every other tool) need the prefix, and new transformers reads both.
    text_state = {
        "text_model." + key.removeprefix("text_model."): value
        for key, value in _cast(bundle.text_encoder.state_dict(), dtype).items()
    }
    bundle.text_encoder.config.save_pretrained(str(tmp / "text_encoder"))
    _write_weights(tmp / "text_encoder", "model.safetensors", "pytorch_model.bin", text_state, safe)
    bundle.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    scheduler = DDIMScheduler.from_config(
        bundle.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    scheduler.save_config(tmp / "scheduler")
    (tmp / "model_index.json").write_text(
        json.dumps(_model_index("DDIMScheduler"), indent=2) + "\n", encoding="utf-8"
    )


def save_diffusers(
    bundle: ModelBundle,
    folder: str | Path,
    *,
    safe_serialization: bool = True,
    precision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `bundle` as a diffusers folder (unet, vae, text_encoder, tokenizer, scheduler).

    Written into a temporary sibling folder and renamed into place, so readers never see a
    half-written model. Weights are `.safetensors` (or `.bin` without safe serialization), cast
    to `precision` when given; the scheduler is DDIM with the bundle's prediction type (as the
    reference writes); needs no network, unlike the reference for single-file sources.
    """
    folder = Path(folder)
    _refuse_overwrite(folder, overwrite)
    _check_no_adapters(bundle)
    dtype = resolve_precision(precision)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    backup = None
    try:
        _write_folder(bundle, tmp, safe_serialization, dtype)
        if folder.exists():
            backup = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            folder.rename(backup)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    log.info("saved diffusers folder %s", folder)
    return folder
