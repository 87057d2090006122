"""Resume policy: which state to continue from, and which config changes a resume may carry."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdtrain.config.sections import SavingSection
from sdtrain.engine.state import find_latest_state
from sdtrain.errors import TrainingError

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


def resolve_resume(saving: SavingSection, output_dir: Path) -> Path | None:
    """The state folder to resume from: `resume` as given, the newest valid one for "auto"."""
    if not saving.resume:
        return None
    if saving.resume == "auto":
        found = find_latest_state(output_dir)
        if found is None:
            logger.info('resume = "auto": no complete state in %s, starting fresh', output_dir)
        return found
    return Path(saving.resume)


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
