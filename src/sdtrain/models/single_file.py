"""Load an original (LDM) single-file SD 1.x/2.x checkpoint offline with diffusers' converters.

The architecture comes from a bundled diffusers config folder chosen by checking the file's key
names and shapes against each candidate (full-size SD1 / SD2, the tiny built-ins, the shipped
toys), so sd1 vs sd2 is detected from the weights and missing keys are reported by name before
anything is allocated.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from sdtrain.errors import ModelLoadError
from sdtrain.models.assemble import assemble_bundle
from sdtrain.models.builtin import BUILTINS, asset_folder
from sdtrain.models.bundle import ModelBundle, ModelSource, VaeReady
from sdtrain.models.checkpoint_file import CheckpointFile
from sdtrain.models.diffusers_folder import check_v2_flag
from sdtrain.models.families import (
    Prediction,
    config_dir,
    family_from_keys,
    family_spec,
    prediction_from_metadata,
    prediction_from_name,
)
from sdtrain.models.ldm_keys import (
    UNET_PREFIX,
    VAE_PREFIX,
    components_to_ldm,
    openclip_extra_keys,
)

log = logging.getLogger(__name__)

SD2_BASE_GLOBAL_STEP = 875000  # SD 2.x-base (512, epsilon) checkpoints record this step


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warning on every dtype cast ("modules that should be kept in float32:
    []"), which its own from_single_file triggers when given a dtype."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


@functools.lru_cache(maxsize=16)
def expected_layout(config_path: str, family: str) -> dict[str, tuple[int, ...]]:
    """LDM key -> shape that a model built from `config_path` has, computed on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(config_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    layout = components_to_ldm(family, unet, vae, text)
    if family == "sd2":  # the extra OpenCLIP layer / projection are optional on load
        layers = int(text.config.num_hidden_layers)
        for key in openclip_extra_keys(list(layout), layers):
            layout.pop(key, None)
    return {key: tuple(value.shape) for key, value in layout.items()}


def candidate_configs(family: str, prediction: Prediction) -> list[Path]:
    """Config folders to try for a file of `family`: full size first, then tiny and toys."""
    spec = family_spec(family)
    folders = [config_dir(spec.config_names[prediction]), config_dir(f"tiny-{family}")]
    for item in BUILTINS.values():
        folder = asset_folder(item.folder) if item.folder else None
        if folder is not None and item.family == family and (folder / "unet").is_dir():
            folders.append(folder)
    return folders


def _problems(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> tuple[list[str], list[str]]:
    missing = sorted(key for key in expected if key not in shapes)
    mismatched = sorted(
        f"{key} {list(shapes[key])} (expected {list(shape)})"
        for key, shape in expected.items()
        if key in shapes and tuple(shapes[key]) != shape
    )
    return missing, mismatched


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _plausible(folder: Path, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Cheap pre-check from config.json: UNet input width (skips building unlikely layouts)."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        return True
    config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    return int(config["block_out_channels"][0]) == conv_in[0]


def choose_config(
    reader: CheckpointFile, family: str, prediction: Prediction
) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The first candidate config whose layout the file satisfies; else a ModelLoadError."""
    shapes = reader.shapes()
    best: tuple[int, list[str], list[str]] | None = None
    folders = candidate_configs(family, prediction)
    plausible = [folder for folder in folders if _plausible(folder, shapes)]
    for folder in plausible or folders:
        expected = expected_layout(str(folder), family)
        missing, mismatched = _problems(shapes, expected)
        if not missing and not mismatched:
            return folder, expected
        score = len(missing) + len(mismatched)
        if best is None or score < best[0]:
            best = (score, missing, mismatched)
    assert best is not None
    _, missing, mismatched = best
    if missing:
        message = f"{reader.path} is missing {len(missing)} weights: {_listing(missing)}"
    else:
        message = f"{reader.path} has weights of unexpected shape: {_listing(mismatched, 3)}"
    raise ModelLoadError(
        message,
        hint="the file is incomplete or not an SD 1.x/2.x checkpoint of a supported size",
    )


def detect_prediction(
    flag: bool | None, reader: CheckpointFile, family: str
) -> tuple[Prediction, str]:
    """(prediction type, why): the flag, else metadata, else SD2 heuristics, else the default."""
    found = prediction_from_metadata(reader.metadata)
    if flag is not None:
        chosen: Prediction = "v_prediction" if flag else "epsilon"
        if found is not None and found != chosen:
            log.warning(
                "v_parameterization = %s overrides the file's metadata (%s)",
                str(flag).lower(),
                found,
            )
        return chosen, "v_parameterization setting"
    if found is not None:
        return found, "file metadata"
    if family == "sd1":
        return "epsilon", "SD 1.x default"
    if reader.extras.get("global_step") == SD2_BASE_GLOBAL_STEP:
        return "epsilon", f"global_step {SD2_BASE_GLOBAL_STEP} (SD 2.x-base)"
    by_name = prediction_from_name(reader.path.name)
    if by_name is not None:
        return by_name, "file name"
    return "v_prediction", "SD 2.x default (768-v)"


@contextlib.contextmanager
def _converting(path: Path) -> Iterator[None]:
    """diffusers' single-file conversion, quiet, its failures as ModelLoadError naming `path`."""
    try:
        with quiet_diffusers():
            yield
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"converting {path} failed: {error}",
            hint="the file may be damaged or not an SD 1.x/2.x checkpoint",
        ) from error


def _check_complete(path: Path, name: str, module: torch.nn.Module) -> None:
    if any(t.is_meta for t in module.state_dict().values()):
        raise ModelLoadError(
            f"{path}: the {name} was not fully loaded", hint="the file is incomplete"
        )


def load_single_file(
    path: Path,
    source: ModelSource,
    *,
    v2: bool | None = None,
    v_parameterization: bool | None = None,
    tokenizer_cache_dir: str | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
    vae_ready: VaeReady | None = None,
) -> ModelBundle:
    """Load an original-layout .safetensors / .ckpt into a ModelBundle, fully offline.

    EMA copies and other extra keys are ignored; missing or wrongly shaped weights raise a
    ModelLoadError that names them; `v2` contradicting the weights raises too. `dtypes` maps
    unet / vae / text_encoder to the dtype to load in (cast tensor by tensor while loading, so a
    float16 file loaded in float16 never exists in float32). The VAE is loaded first;
    `vae_ready` (when given) is called with it before the UNet and text encoder exist.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    dtypes = dtypes or {}
    reader = CheckpointFile(path)
    keys = set(reader.keys())
    family = family_from_keys(keys)
    if family is None or not any(key.startswith(UNET_PREFIX) for key in keys):
        raise ModelLoadError(
            f"{path} is not a full SD checkpoint (no "
            f"{'text encoder' if family is None else 'UNet'} weights)",
            hint="a LoRA, embedding or VAE-only file cannot be a base model; use `vae = ...` for "
            "VAE files",
        )
    check_v2_flag(v2, family, str(path))
    prediction, why = detect_prediction(v_parameterization, reader, family)
    log.info("%s: %s, %s (%s)", path.name, family, prediction, why)
    folder, expected = choose_config(reader, family, prediction)
    te_prefix = family_spec(family).te_prefix
    common = {"config": str(folder), "local_files_only": True}
    with _converting(path):
        vae_keys = [k for k in expected if k.startswith(VAE_PREFIX)]
        vae = AutoencoderKL.from_single_file(
            reader.get(vae_keys), subfolder="vae", torch_dtype=dtypes.get("vae"), **common
        )
    _check_complete(path, "VAE", vae)
    if vae_ready is not None:  # outside _converting: its errors are its own
        vae = vae_ready(vae)
    with _converting(path):
        unet_keys = [k for k in expected if k.startswith(UNET_PREFIX)]
        unet = UNet2DConditionModel.from_single_file(
            reader.get(unet_keys), subfolder="unet", torch_dtype=dtypes.get("unet"), **common
        )
        te_keys = [k for k in expected if k.startswith(te_prefix)]
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel,
            reader.get(te_keys),
            subfolder="text_encoder",
            config=str(folder),
            torch_dtype=dtypes.get("text_encoder"),
            local_files_only=True,
        )
    for name, module in (("UNet", unet), ("text encoder", text_encoder)):
        _check_complete(path, name, module)
    source.kind = "single_file"
    source.path = str(path)
    source.metadata = dict(reader.metadata)
    reader.close()
    return assemble_bundle(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.eval(),
        family=family,
        prediction_type=prediction,
        source=source,
        tokenizer_cache_dir=tokenizer_cache_dir,
    )
