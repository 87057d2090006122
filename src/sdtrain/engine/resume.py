"""Resume policy: which state to continue from, and which config changes a resume may carry."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.config.sections import SavingSection
from sdtrain.engine.state import MANIFEST, find_latest_state
from sdtrain.errors import TrainingError

if TYPE_CHECKING:
    from sdtrain.data.items import DatasetPlan

logger = logging.getLogger(__name__)

# Keys that do not change what is trained (outputs, cadence, logging, sampling, workers).
HARMLESS_PREFIXES = ("sample.", "logging.", "saving.", "dataset.skip_invalid_images")
HARMLESS_KEYS = {
    "training.output_dir",
    "training.output_name",
    "training.max_data_loader_n_workers",
    "training.persistent_data_loader_workers",
    "training.vae_batch_size",
    "training.max_nonfinite_steps",
    "training.host_sync",
    "training.torch_compile",  # kernels only, as model.attention
    "training.dynamo_backend",
    "training.dynamo_mode",
    "training.validate_every_n_steps",
    "training.validate_every_n_epochs",
    "training.max_validation_steps",
    "network.save_model_as",
    "network.save_diffusers_lora",
    "network.no_metadata",
    "network.training_comment",
    "model.attention",
    "model.xformers",
    "model.mem_eff_attn",
    "model.sdpa",
    "model.tokenizer_cache_dir",
}


# Keys that change how the run continues without making its state wrong: the new value applies
# from the resumed step on (logged as a warning: the result is no longer identical to an
# uninterrupted run). Everything else that changes what is trained (data, batch layout, seed,
# model, adapter structure, optimizer kind, precision) would corrupt the continuation and is
# refused unless listed in resume_allow_changes.
# (LR keys are not here: the resumed optimizer and scheduler states carry the old rates, so a
# new value would be silently ignored; they stay refused.)
CONTINUATION_KEYS = {
    "training.max_grad_norm",
    "training.prior_loss_weight",
    "training.gradient_checkpointing",
    "training.noise_offset",
    "training.noise_offset_random_strength",
    "training.adaptive_noise_scale",
    "training.multires_noise_iterations",
    "training.multires_noise_discount",
    "training.ip_noise_gamma",
    "training.ip_noise_gamma_random_strength",
    "training.min_timestep",
    "training.max_timestep",
    "training.loss_type",
    "training.huber_schedule",
    "training.huber_c",
    "training.huber_scale",
    "training.min_snr_gamma",
    "training.scale_v_pred_loss_like_noise_pred",
    "training.v_pred_like_loss",
    "training.debiased_estimation_loss",
}

# Keys whose growth continues a run (train longer): the schedule is rebuilt for the new length.
LENGTH_KEYS = ("training.max_train_steps", "training.max_train_epochs")


def _longer(old: Any, new: Any) -> bool:
    """True when a run length grows (None -> N counts: epochs were not used before)."""
    if new is None:
        return False
    return old is None or (isinstance(old, int) and isinstance(new, int) and new > old)


def resolve_resume(saving: SavingSection, output_dir: Path) -> Path | None:
    """The state folder to resume from: `resume` as given, the newest valid one for "auto"."""
    if not saving.resume:
        return None
    if saving.resume == "auto":
        found = find_latest_state(output_dir)
        if found is None:
            logger.info('resume = "auto": no complete state in %s, starting fresh', output_dir)
        return found
    return _state_in(Path(saving.resume))


def _state_in(path: Path) -> Path:
    """`path` itself when it is a state folder; for an output folder, its newest complete state.

    A folder holding no complete state is refused with the `*-state` folders it does hold.
    """
    if not path.is_dir() or (path / MANIFEST).is_file() or path.name.endswith("-state"):
        return path
    found = find_latest_state(path)
    if found is not None:
        logger.info(
            "resume: %s is an output folder; continuing from its newest state %s", path, found.name
        )
        return found
    names = sorted(
        p.name for p in path.glob("*-state") if p.is_dir() and not p.name.startswith(".")
    )
    held = ", ".join(names) if names else "none"
    raise TrainingError(
        f"cannot resume from {path}: it is not a state folder and holds no complete state "
        f"(*-state folders there: {held})",
        hint="give one of those state folders, or train with save_state = true to write states",
    )


def data_fingerprint(datasets: list[DatasetPlan], batches_per_epoch: int) -> dict[str, Any]:
    """The `[data]` table a state records beside the config: image count, batches per epoch and
    a digest of every image's path (relative to its subset folder, so a moved dataset still
    matches), file size, caption, repeats and role.

    Catches what no config key shows: images or captions added, removed or edited in the
    folders (or a blueprint file edited) between a save and its resume.
    """
    digest = hashlib.sha256()
    count = 0
    for plan in datasets:
        for subset in plan.subsets:
            base = subset.image_dir
            for entry in subset.images:
                path = entry.path
                name = path.relative_to(base) if base and path.is_relative_to(base) else path
                size = path.stat().st_size if path.is_file() else -1
                row = [plan.index, subset.index, str(name), size, entry.caption]
                digest.update(json.dumps([*row, entry.num_repeats, entry.is_reg]).encode())
                count += 1
    return {
        "images": count,
        "batches_per_epoch": batches_per_epoch,
        "digest": digest.hexdigest()[:16],
    }


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and prefix.count(".") < 1:
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`table.key` -> (saved value, current value) for every key that differs."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten("", saved, a)
    _flatten("", current, b)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(
    saved: dict[str, Any], current: dict[str, Any], allowed: list[str]
) -> list[str]:
    """Log harmless changes; raise TrainingError naming changes that break exact continuation
    unless listed in `saving.resume_allow_changes` ("*" allows all). Returns the changed keys."""
    changes = config_changes(saved, current)
    breaking = []
    for key, (old, new) in changes.items():
        harmless = key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES)
        if key in LENGTH_KEYS and _longer(old, new):
            logger.info(
                "resume: %s raised from %r to %r; the LR schedule was recomputed for the new "
                "length (steps already taken keep their learning rates)",
                key,
                old,
                new,
            )
            continue
        if key in CONTINUATION_KEYS and not (harmless or "*" in allowed or key in allowed):
            logger.warning(
                "resume: %s changed from %r to %r; training continues with the new value from "
                "this step on (no longer identical to an uninterrupted run)",
                key,
                old,
                new,
            )
            continue
        if harmless or "*" in allowed or key in allowed:
            logger.info("resume: %s changed from %r to %r", key, old, new)
        else:
            breaking.append(f"{key}: {old!r} -> {new!r}")
    if breaking:
        keys = " ".join(b.split(":")[0] for b in breaking)
        raise TrainingError(
            "the config differs from the resumed state in ways that break exact continuation:\n  "
            + "\n  ".join(breaking),
            hint=f"restore those values, or allow them: --resume_allow_changes {keys}",
        )
    return list(changes)
