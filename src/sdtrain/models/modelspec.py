"""ModelSpec (`modelspec.*`, sai_model_spec 1.0.1) metadata: the one builder for every file kind.

Checkpoints (models/save.py, DreamBooth / fine-tune saves), LoRAs (methods/adapters/metadata.py
adds the ss_* training keys around it) and Textual Inversion embeddings all call
`modelspec_metadata`; `as_kind` turns base-model keys into an adapter's or embedding's.
"""

from __future__ import annotations

import datetime as _dt
from typing import Literal

from sdtrain import __version__
from sdtrain.models.family import ModelFamily

MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_DIFFUSERS = "diffusers"
Kind = Literal["checkpoint", "lora", "textual-inversion"]
_SUFFIX = {"checkpoint": "", "lora": "/lora", "textual-inversion": "/textual-inversion"}
_TITLE = {"checkpoint": "Checkpoint", "lora": "LoRA", "textual-inversion": "TextualInversion"}


def modelspec_metadata(
    family: ModelFamily,
    *,
    kind: Kind = "checkpoint",
    title: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    clip_skip: int | None = None,
    timestep_range: tuple[int | None, int | None] | None = None,
    date: _dt.datetime | None = None,
    extra: dict[str, str | None] | None = None,
    default_title: bool = True,
    version: bool = True,
) -> dict[str, str]:
    """The modelspec keys the reference writes (§7.6 / §9.3); None values are omitted.

    architecture: stable-diffusion-v1 / -v2-512 / -v2-768-v (+ /lora, /textual-inversion);
    implementation: diffusers for LoRA, Stability's generative-models URL otherwise;
    resolution "WxH" (default: the family's native resolution); prediction_type epsilon / v;
    `extra` adds optional keys (author, description, license, tags, trigger_phrase, ...) as
    `modelspec.<key>`. Without `default_title` an unknown title is left out (a LoRA's default
    title is set by `as_kind`); without `version` implementation_version is left out (the keys
    a LoRA gets from the family alone).
    """
    now = (date or _dt.datetime.now()).replace(microsecond=0)
    if resolution is None:
        resolution = family.resolution
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    values: dict[str, str | None] = {
        "sai_model_spec": MODELSPEC_VERSION,
        "architecture": family.modelspec_architecture + _SUFFIX[kind],
        "implementation": IMPLEMENTATION_DIFFUSERS if kind == "lora" else IMPLEMENTATION_SGM,
        "title": title or (f"{_TITLE[kind]}@{now.isoformat()}" if default_title else None),
        "resolution": f"{width}x{height}",
        "date": now.isoformat(),
        "prediction_type": "v" if family.is_v else "epsilon",
        "encoder_layer": str(clip_skip) if clip_skip is not None else None,
        "implementation_version": f"sdtrain/{__version__}" if version else None,
    }
    if timestep_range is not None and any(bound is not None for bound in timestep_range):
        low, high = timestep_range
        values["timestep_range"] = (
            f"{low if low is not None else 0},{high if high is not None else 1000}"
        )
    for key, value in (extra or {}).items():
        values[key.removeprefix("modelspec.")] = value
    return {f"modelspec.{key}": str(value) for key, value in values.items() if value is not None}


def base_modelspec(family: ModelFamily, now: float) -> dict[str, str]:
    """The modelspec.* keys known from the model family alone (native resolution, no title,
    no implementation_version), dated `now` (epoch seconds, whole seconds)."""
    date = _dt.datetime.fromtimestamp(int(now))
    return modelspec_metadata(family, date=date, default_title=False, version=False)


def as_kind(
    md: dict[str, str],
    kind: Kind,
    title_prefix: str,
    now: float | None = None,
) -> dict[str, str]:
    """Base-model modelspec keys -> a LoRA's or embedding's: `<arch>/<kind>`, its implementation
    (diffusers for LoRA), and the reference's default title `<prefix>@<time.time()>` when no
    title is known."""
    import time

    out = dict(md)
    arch = out.get("modelspec.architecture")
    suffix = _SUFFIX[kind]
    if arch and suffix and not arch.endswith(suffix):
        out["modelspec.architecture"] = f"{arch}{suffix}"
    out["modelspec.implementation"] = (
        IMPLEMENTATION_DIFFUSERS if kind == "lora" else IMPLEMENTATION_SGM
    )
    out.setdefault("modelspec.title", f"{title_prefix}@{time.time() if now is None else now}")
    return out
