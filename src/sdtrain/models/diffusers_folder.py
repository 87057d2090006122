"""Load a diffusers-format model folder (unet/, vae/, text_encoder/, scheduler/) offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.errors import ModelLoadError
from sdtrain.models.assemble import assemble_bundle
from sdtrain.models.bundle import ModelBundle, ModelSource, VaeReady
from sdtrain.models.families import Prediction, family_from_hidden_act, family_spec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder")


def is_diffusers_folder(path: Path) -> bool:
    """True when `path` looks like a diffusers pipeline folder."""
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def _check_loading_info(info: dict, what: str, folder: Path) -> None:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        shown = ", ".join(missing[:8]) + (
            f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        )
        detail = f"missing weights: {shown}" if missing else f"shape mismatches: {mismatched[:4]}"
        raise ModelLoadError(
            f"the {what} in {folder} is incomplete ({detail})",
            hint="the folder is damaged or not an SD 1.x/2.x model; re-export or re-download it",
        )


WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


def _safetensors_files(sub: Path, name: str) -> list[Path] | None:
    """The component's safetensors file(s) (single or sharded with an index), else None."""
    stem = WEIGHT_NAMES[name]
    single = sub / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = sub / f"{stem}.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = [sub / shard for shard in sorted(set(weight_map.values()))]
    return files if all(f.is_file() for f in files) else None


def _build_empty(sub: Path, name: str):
    """The component's module from its config.json, parameters on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrain.models.stream import empty_module

    with empty_module():
        if name == "text_encoder":
            return CLIPTextModel(CLIPTextConfig.from_pretrained(str(sub)))
        cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
        return cls.from_config(cls.load_config(str(sub)))


def _stream_component(sub: Path, name: str, dtype: torch.dtype | None):
    """Build on the meta device and stream the weights in (models/stream.py); None when the
    folder is not a plain safetensors layout that covers every weight (the library loads it)."""
    from sdtrain.models.stream import stream_into

    files = _safetensors_files(sub, name)
    if files is None:
        return None
    try:
        model = _build_empty(sub, name)
        prefixes = ("text_model.",) if name == "text_encoder" else ()
        missing = stream_into(model, files, dtype, prefixes)
    except (ValueError, OSError, KeyError) as error:
        log.debug("streaming %s failed (%s); loading through the library", sub, error)
        return None
    if missing:
        log.debug(
            "%s lacks %d weights for streaming; loading through the library", sub, len(missing)
        )
        return None
    # what from_pretrained records, so configs (and anything saved from them) stay the same
    if name == "text_encoder":
        model.config._name_or_path = str(sub)
        model.config.dtype = next(model.parameters()).dtype
    else:
        model.register_to_config(_name_or_path=str(sub))
    return model.eval()


def _load_component(folder: Path, name: str, dtype: torch.dtype | None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    from transformers.utils import logging as hf_logging

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    sub = folder / name
    if not (sub / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} has no {name}/config.json",
            hint="a diffusers model folder needs unet/, vae/ and text_encoder/ subfolders",
        )
    streamed = _stream_component(sub, name, dtype)
    if streamed is not None:
        return streamed
    kwargs = {"local_files_only": True, "output_loading_info": True}
    if dtype is not None:  # transformers 5 renamed torch_dtype to dtype; diffusers did not
        kwargs["dtype" if name == "text_encoder" else "torch_dtype"] = dtype
    hf_logging.disable_progress_bar()
    try:
        model, info = classes[name].from_pretrained(str(sub), **kwargs)
    except ModelLoadError:
        raise
    except Exception as error:  # diffusers/transformers/safetensors raise many kinds
        raise ModelLoadError(
            f"cannot load the {name} from {sub}: {error}",
            hint="check that the folder is complete (weights not truncated) and is an SD 1.x/2.x "
            "diffusers model",
        ) from error
    _check_loading_info(info, name, folder)
    return model.eval()


def folder_prediction_type(folder: Path) -> Prediction | None:
    """prediction_type from scheduler/scheduler_config.json, None if absent."""
    config = folder / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("prediction_type")
    except (OSError, ValueError):
        return None
    return value if value in ("epsilon", "v_prediction") else None


def load_diffusers_folder(
    folder: Path,
    source: ModelSource,
    *,
    tokenizer_cache_dir: str | None = None,
    prediction_type: Prediction | None = None,
    v2: bool | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
    vae_ready: VaeReady | None = None,
) -> ModelBundle:
    """Load unet/vae/text_encoder of a diffusers folder; family from the text encoder.

    The VAE is loaded first; `vae_ready` (when given) is called with it before the UNet and
    text encoder exist, and its return value is the bundle's VAE (models/load.py).

    sd1 vs sd2 comes from the text encoder (quick_gelu = OpenAI CLIP, gelu = OpenCLIP), checked
    against the UNet's cross-attention width; `v2` contradicting it raises ModelLoadError. The
    prediction type is `prediction_type` if given, else the folder's scheduler config, else the
    family default. The tokenizer is the bundled one (the reference never read it from the model).
    """
    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (no model_index.json or unet/)",
            hint="point pretrained_model_name_or_path at a .safetensors/.ckpt file or a diffusers "
            "folder",
        )
    dtypes = dtypes or {}
    vae = _load_component(folder, "vae", dtypes.get("vae"))
    if vae_ready is not None:
        vae = vae_ready(vae)
    unet = _load_component(folder, "unet", dtypes.get("unet"))
    text_encoder = _load_component(folder, "text_encoder", dtypes.get("text_encoder"))
    family = family_from_hidden_act(str(text_encoder.config.hidden_act))
    if family is None:
        raise ModelLoadError(
            f"the text encoder in {folder} uses {text_encoder.config.hidden_act!r}, neither "
            "SD1's CLIP (quick_gelu) nor SD2's OpenCLIP (gelu)",
            hint="only SD 1.x / 2.x models are supported",
        )
    if int(unet.config.cross_attention_dim) != int(text_encoder.config.hidden_size):
        raise ModelLoadError(
            f"{folder}: UNet cross-attention width {unet.config.cross_attention_dim} differs from "
            f"the text encoder width {text_encoder.config.hidden_size}",
            hint="the folder mixes parts of different models",
        )
    check_v2_flag(v2, family, str(folder))
    chosen = (
        prediction_type or folder_prediction_type(folder) or family_spec(family).default_prediction
    )
    source.path = source.path or str(folder)
    return assemble_bundle(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        family=family,
        prediction_type=chosen,
        source=source,
        tokenizer_cache_dir=tokenizer_cache_dir,
    )


def check_v2_flag(v2: bool | None, family: str, where: str) -> None:
    """Raise when the user's `v2` flag contradicts the family found in the weights."""
    if v2 is None:
        return
    wanted = "sd2" if v2 else "sd1"
    if wanted != family:
        found = (
            "SD 2.x (OpenCLIP text encoder)" if family == "sd2" else "SD 1.x (CLIP text encoder)"
        )
        raise ModelLoadError(
            f"v2 = {str(v2).lower()} but {where} is an {found} model",
            hint="remove the v2 setting (it is detected from the weights) or pick the right model",
        )
