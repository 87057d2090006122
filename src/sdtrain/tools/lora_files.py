"""LoRA files for `sdtrain generate`: detect kohya vs diffusers layout, convert diffusers to kohya.

sdtrain applies LoRAs through the kohya format (methods/adapters/apply.py). A diffusers/PEFT file
(`unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_B.weight`, rank/alpha in the safetensors
`lora_adapter_metadata`, as written by diffusers' `save_lora_weights` and by sdtrain) or the older
diffusers layout (`<root>.<path>.lora.down.weight` + optional `<root>.<path>.alpha`) is renamed to
kohya keys; without alpha information alpha = rank (scale 1), which is what diffusers assumes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sdtrain.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

LoraLayout = Literal["kohya", "diffusers"]

_ROOTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_SUFFIXES = {
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.weight": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight",
    ".lora.up.weight": "lora_up.weight",
}
METADATA_KEY = "lora_adapter_metadata"


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of a LoRA file (.pt/.ckpt via the kohya reader)."""
    from sdtrain.methods.adapters.kohya import read

    return read(path)


def detect_layout(path: Path, keys: list[str]) -> LoraLayout:
    """'kohya' (lora_unet_/lora_te_ keys) or 'diffusers' (unet./text_encoder. keys)."""
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    sample = ", ".join(keys[:3])
    raise ModelLoadError(
        f"{path}: unrecognised LoRA layout (keys like {sample})",
        hint="sdtrain generate reads SD1/SD2 LoRAs in the kohya or the diffusers/PEFT layout",
    )


def _pattern_value(patterns: dict[str, Any], module_path: str) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches the path itself or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return None


def _configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per-root LoraConfig values from diffusers' `lora_adapter_metadata` ({} when absent)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    flat = json.loads(raw)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        root, _, name = key.partition(".")
        configs.setdefault(root, {})[name] = value
    return configs


def _kohya_name(root: str, module_path: str) -> str:
    if root == "text_encoder" and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path  # flattened CLIP (transformers >= 5.6) saves
    return _ROOTS[root] + module_path.replace(".", "_")


def diffusers_to_kohya(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Kohya-keyed tensors (down, up, 0-d float32 alpha per module) from a diffusers-layout file."""
    import torch

    configs = _configs(metadata)
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    modules: dict[str, tuple[str, str]] = {}  # kohya name -> (root, module path)
    for key, value in tensors.items():
        root, _, rest = key.partition(".")
        if root not in _ROOTS:
            raise ModelLoadError(
                f"{path}: unexpected key {key}",
                hint="only unet.* and text_encoder.* LoRA keys are supported",
            )
        if rest.endswith(".alpha"):
            alphas[_kohya_name(root, rest[: -len(".alpha")])] = float(value.float().item())
            continue
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            raise ModelLoadError(
                f"{path}: unsupported LoRA tensor {key}",
                hint="plain LoRA (lora_A/lora_B) only; DoRA and other adapter kinds are not read",
            )
        module_path = rest[: -len(suffix)]
        name = _kohya_name(root, module_path)
        modules[name] = (root, module_path)
        out[f"{name}.{_SUFFIXES[suffix]}"] = value
    for name, (root, module_path) in modules.items():
        if f"{name}.lora_down.weight" not in out or f"{name}.lora_up.weight" not in out:
            raise ModelLoadError(
                f"{path}: module {module_path} lacks its down or up weight",
                hint="the file is incomplete; re-export it",
            )
        rank = int(out[f"{name}.lora_down.weight"].shape[0])
        config = configs.get(root, {})
        alpha = alphas.get(name)
        if alpha is None:
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module_path)
        if alpha is None:
            alpha = config.get("lora_alpha", rank)
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def kohya_file_for(path: Path, workdir: Path) -> Path:
    """`path` itself for a kohya file; for a diffusers file, a kohya copy written into `workdir`."""
    from safetensors.torch import save_file

    tensors, metadata = read_lora(path)
    if detect_layout(path, list(tensors)) == "kohya":
        return path
    converted = workdir / f"{path.stem}.kohya.safetensors"
    save_file(
        {k: v.contiguous() for k, v in diffusers_to_kohya(path, tensors, metadata).items()},
        str(converted),
    )
    return converted
