"""Pre-load checks: everything a run would trip over later, found before any weight loads.

`sdtrain train <method>` runs these in `prepare`, so `--dry-run` and a real run refuse the same
inputs with the same messages: model / VAE / network_weights files that are missing or not a
readable format (header only), optimizer and LR-scheduler names that do not resolve or need an
extra that is not installed, warm-up with a scheduler that ignores it, fp16 on a CPU, xformers
without CUDA, latent caching with per-step pixel augmentation, a tracker whose package is
missing, and dataset keys that sdtrain cannot honour (refused by name).

torch is imported only by the checks that need it (fp16 / xformers device checks, and optimizer
or scheduler names outside the defaults), so a default dry run stays light.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    from sdtrain.config.loader import LoadedConfig
    from sdtrain.data.plan import Plan

logger = logging.getLogger(__name__)

_SAFETENSORS = (".safetensors",)
_TORCH = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024
# schedulers whose warm-up is ignored (the reference silently drops lr_warmup_steps there)
_NO_WARMUP = ("constant", "adafactor", "piecewise_constant")
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class _Where:
    """Locates `table.key` of a loaded config: command line, file:line, or nowhere."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded

    def problem(self, dotted: str, message: str, hint: str | None = None, **value: Any) -> Problem:
        from sdtrain.config.flags import CLI

        table, _, key = dotted.partition(".")
        file: str | None = None
        line = None
        if dotted in self.loaded.cli_keys:
            file = CLI
        elif self.loaded.source is not None:
            file = str(self.loaded.source.path)
            line = self.loaded.source.lines.get((table, key))
        has = "value" in value
        return Problem(
            key=dotted,
            message=message,
            file=file,
            line=line,
            value=value.get("value"),
            has_value=has,
            hint=hint,
        )


def file_format_problem(path: Path) -> str | None:
    """Why `path` is not a readable model file, from its header only; None when it looks fine.

    safetensors: the 8-byte length and the JSON header must parse and fit in the file.
    .ckpt/.pt/.bin: a torch zip archive (or a legacy pickle stream).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if path.suffix.lower() in _SAFETENSORS or (len(head) == 8 and _looks_safe(handle)):
                if len(head) < 8:
                    return f"{size} bytes: too short for a safetensors file"
                (length,) = struct.unpack("<Q", head)
                if length > min(size - 8, _MAX_HEADER):
                    return "its safetensors header is longer than the file (truncated?)"
                handle.seek(8)
                header = json.loads(handle.read(length))
                if not isinstance(header, dict):
                    return "the safetensors header is not a JSON object"
                end = max(
                    (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                    default=0,
                )
                if 8 + length + end > size:
                    return (
                        f"truncated: the header needs {8 + length + end} bytes, the file has {size}"
                    )
                return None
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        return "not a safetensors file (its header does not parse)"
    if path.suffix.lower() in _TORCH:
        if zipfile.is_zipfile(path) or head[:1] == b"\x80":
            return None
        return "not a torch checkpoint (neither a zip archive nor a pickle stream)"
    return f"unknown model file type {path.suffix or '(no suffix)'!r}: use .safetensors or .ckpt"


def _looks_safe(handle: Any) -> bool:
    here = handle.tell()
    byte = handle.read(1)
    handle.seek(here)
    return byte == b"{"


def _model_problem(spec: str, what: str) -> tuple[str, str] | None:
    """(message, hint) when `spec` names no loadable model; None when it looks loadable."""
    from sdtrain.models.builtin import available_builtins, is_builtin

    if is_builtin(spec):
        name = spec.split(":", 1)[1]
        if name not in available_builtins():
            return (
                f"no built-in model {spec!r}",
                "built-in models: " + ", ".join(f"builtin:{n}" for n in available_builtins()),
            )
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        reason = file_format_problem(path)
        return (
            (f"{what} {path}: {reason}", "check the file (copy it again if truncated)")
            if reason
            else None
        )
    if path.is_dir():
        markers = ("model_index.json", "config.json", "unet", "vae")
        if not any((path / m).exists() for m in markers):
            return (
                f"{path} is a folder but not a diffusers model (no model_index.json)",
                "give a diffusers folder or a .safetensors/.ckpt file",
            )
        return None
    from sdtrain.models.hub import looks_like_hub_id

    if looks_like_hub_id(spec):
        return None  # resolved from the HF cache at load; that error names the cache
    return (
        f"{what} {spec!r} not found",
        "check the path (relative paths start at the config file)",
    )


def _model_checks(loaded: LoadedConfig, where: _Where) -> list[Problem]:
    cfg = loaded.config
    problems = []
    for dotted, spec, what in (
        ("model.pretrained_model_name_or_path", cfg.model.pretrained_model_name_or_path, "model"),
        ("model.vae", cfg.model.vae, "VAE"),
    ):
        if spec:
            found = _model_problem(str(spec), what)
            if found:
                problems.append(where.problem(dotted, found[0], found[1]))
    network = getattr(cfg, "network", None)
    weights = getattr(network, "network_weights", None) if network is not None else None
    if weights:
        path = Path(weights)
        if not path.is_file():
            problems.append(
                where.problem("network.network_weights", f"LoRA file {path} not found", None)
            )
        else:
            reason = file_format_problem(path)
            if reason:
                problems.append(
                    where.problem("network.network_weights", f"LoRA file {path}: {reason}")
                )
    return problems


def _optimizer_checks(loaded: LoadedConfig, where: _Where) -> list[Problem]:
    from sdtrain.errors import MissingExtraError

    section = loaded.config.optimizer
    problems: list[Problem] = []
    name = section.optimizer_type or "AdamW"
    if name.lower() != "adamw":
        from sdtrain.engine.optim import OPTIMIZERS, resolve_optimizer_class

        spec = OPTIMIZERS.get(name.lower())
        if spec is not None and spec.extra is not None:
            if importlib.util.find_spec(spec.module.split(".")[0]) is None:
                extra, package = spec.extra
                problems.append(
                    where.problem(
                        "optimizer.optimizer_type",
                        f"{spec.name} needs the optional package {package!r}, not installed",
                        f"pip install 'sdtrain[{extra}]'  (or: pip install {package})",
                        value=name,
                    )
                )
        else:
            try:
                resolve_optimizer_class(name)
            except ConfigError as err:
                problems.extend(_relocate(err.problems, where))
            except MissingExtraError as err:
                problems.append(where.problem("optimizer.optimizer_type", err.message, err.hint))
    schedule_free = name.lower().endswith("schedulefree")
    if section.lr_scheduler_type:
        module = section.lr_scheduler_type.rpartition(".")[0]
        if module and importlib.util.find_spec(module.split(".")[0]) is None:
            problems.append(
                where.problem(
                    "optimizer.lr_scheduler_type",
                    f"module {module!r} is not installed",
                    "give a class in torch.optim.lr_scheduler or an importable module.Class",
                    value=section.lr_scheduler_type,
                )
            )
    elif section.lr_scheduler not in ("constant", "cosine", "linear"):
        from sdtrain.engine.schedule import SCHEDULES

        if section.lr_scheduler not in SCHEDULES:
            problems.append(
                where.problem(
                    "optimizer.lr_scheduler",
                    f"unknown lr_scheduler {section.lr_scheduler!r}",
                    f"use one of {', '.join(SCHEDULES)}, or lr_scheduler_type for a custom class",
                    value=section.lr_scheduler,
                )
            )
    ignores = (
        "a custom lr_scheduler_type"
        if section.lr_scheduler_type
        else "a schedule-free optimizer (it schedules internally)"
        if schedule_free
        else f"lr_scheduler = {section.lr_scheduler!r}"
        if section.lr_scheduler in _NO_WARMUP
        else None
    )
    if section.lr_warmup_steps and ignores:
        hint = (
            'use lr_scheduler = "constant_with_warmup" for a warm-up then a constant LR'
            if section.lr_scheduler == "constant" and not schedule_free
            else "set lr_warmup_steps = 0"
        )
        problems.append(
            where.problem(
                "optimizer.lr_warmup_steps",
                f"{ignores} ignores warm-up, but lr_warmup_steps = {section.lr_warmup_steps}",
                hint,
                value=section.lr_warmup_steps,
            )
        )
    return problems


def _relocate(problems: list[Problem], where: _Where) -> list[Problem]:
    out = []
    for p in problems:
        located = where.problem(p.key, p.message, p.hint)
        located.value, located.has_value = p.value, p.has_value
        out.append(located)
    return out


def _device_checks(loaded: LoadedConfig, where: _Where) -> list[Problem]:
    cfg = loaded.config
    problems: list[Problem] = []
    fp16 = cfg.training.mixed_precision == "fp16"
    xformers = cfg.model.attention == "xformers"
    if not (fp16 or xformers):
        return problems
    import torch

    cuda = torch.cuda.is_available()
    if fp16 and not cuda:
        problems.append(
            where.problem(
                "training.mixed_precision",
                "fp16 training needs a CUDA GPU; none is available",
                'use mixed_precision = "bf16" on a CPU, or "no"',
                value="fp16",
            )
        )
    if xformers:
        key = "model.xformers" if cfg.model.xformers else "model.attention"
        if not cuda:
            problems.append(
                where.problem(
                    key,
                    "xformers attention needs a CUDA GPU; none is available",
                    'use attention = "sdpa" (the default)',
                )
            )
        elif importlib.util.find_spec("xformers") is None:
            problems.append(
                where.problem(
                    key,
                    "xformers attention needs the optional package 'xformers', not installed",
                    "pip install 'sdtrain[xformers]', or use attention = \"sdpa\"",
                )
            )
    return problems


def _tracker_checks(loaded: LoadedConfig, where: _Where) -> list[Problem]:
    section = loaded.config.logging
    kinds = {"all": ("tensorboard", "wandb")}.get(section.log_with or "", (section.log_with,))
    if section.log_with is None and section.logging_dir:
        kinds = ("tensorboard",)
    problems = []
    for kind in kinds:
        if kind not in _TRACKER_PACKAGES:
            continue
        module, extra = _TRACKER_PACKAGES[kind]
        if importlib.util.find_spec(module) is None:
            problems.append(
                where.problem(
                    "logging.log_with" if section.log_with else "logging.logging_dir",
                    f"{kind} logging needs the optional package {module!r}, not installed",
                    f"pip install 'sdtrain[{extra}]'  (or: pip install {module}), "
                    "or remove log_with",
                )
            )
        if kind == "tensorboard" and not section.logging_dir:
            problems.append(
                where.problem(
                    "logging.logging_dir",
                    "log_with = tensorboard needs logging_dir",
                    "set [logging] logging_dir (or --logging_dir DIR)",
                )
            )
    return problems


def _plan_checks(loaded: LoadedConfig, plan: Plan, where: _Where) -> list[Problem]:
    """Dataset keys the run cannot honour, named with the blueprint location they come from."""
    problems: list[Problem] = []
    cfg = loaded.config
    if cfg.training.cache_latents:
        from sdtrain.engine.latents import uncacheable_subsets

        for label in uncacheable_subsets(plan.datasets):
            problems.append(
                where.problem(
                    "training.cache_latents",
                    f"cannot cache latents: {label} changes pixels every step",
                    "turn cache_latents off, or remove color_aug / random_crop from that subset",
                )
            )
    if not any(d.validation for d in plan.datasets):
        for key in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            if getattr(cfg.training, key) is not None:
                problems.append(
                    where.problem(
                        f"training.{key}",
                        f"{key} is set but no dataset holds out images to validate on",
                        "set validation_split (e.g. 0.1) in [dataset] or a [[datasets]] table",
                    )
                )
    for dataset in plan.datasets:
        for subset in dataset.subsets:
            if subset.params.get("custom_attributes"):
                origin = subset.origins.get("custom_attributes", "")
                problems.append(
                    Problem(
                        key=f"{subset.label}.custom_attributes",
                        message="custom_attributes is not used by any sdtrain method "
                        f"(set in {origin}); refusing rather than ignoring it",
                        hint="remove custom_attributes from the blueprint",
                    )
                )
    return problems


def check_before_load(loaded: LoadedConfig, plan: Plan | None = None) -> None:
    """Raise one ConfigError listing every problem found without loading weights."""
    where = _Where(loaded)
    problems = [
        *_model_checks(loaded, where),
        *_optimizer_checks(loaded, where),
        *_device_checks(loaded, where),
        *_tracker_checks(loaded, where),
    ]
    if plan is not None:
        problems.extend(_plan_checks(loaded, plan, where))
    if problems:
        raise ConfigError(problems, hint="fix the keys above; nothing was loaded or trained")
