"""What `sdtrain model info` reports: family, prediction type, dtypes, sizes, hashes, metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.errors import ModelLoadError, SdtrainError

COMPONENT_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.",),
    "text_encoder": ("cond_stage_model.",),
}


@dataclass
class ModelInfo:
    """Facts about one model (single file, diffusers folder, hub id or builtin)."""

    spec: str
    kind: str
    family: str | None = None
    prediction_type: str | None = None
    prediction_source: str | None = None
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count
    parameters: dict[str, int] = field(default_factory=dict)  # component -> parameter count
    other_tensors: int = 0  # EMA copies, position_ids, ...
    file_size: int | None = None
    sha256: str | None = None
    autov2: str | None = None  # A1111's new short hash (first 10 hex of SHA-256)
    legacy_hash: str | None = None
    model_hash: str | None = None  # safetensors data-section SHA-256
    metadata: dict[str, str] = field(default_factory=dict)
    loads: bool = False
    load_message: str = ""
    # a file that is not a base model (LoRA, embedding, training state): what it is
    describes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _count(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    counts = dict.fromkeys(COMPONENT_PREFIXES, 0)
    other = 0
    for key, shape in shapes.items():
        size = 1
        for dim in shape:
            size *= dim
        for name, prefixes in COMPONENT_PREFIXES.items():
            if key.startswith(prefixes) and not key.endswith("position_ids"):
                counts[name] += size
                break
        else:
            other += 1
    return counts, other


def _numel(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def inspect_single_file(path: Path, *, hashes: bool = True) -> ModelInfo:
    """Header-level facts of a single file plus a layout check (no weights are allocated)."""
    from sdtrain.models import hashes as hashing
    from sdtrain.models.checkpoint_file import CheckpointFile
    from sdtrain.models.families import family_from_keys
    from sdtrain.models.single_file import choose_config, detect_prediction

    info = ModelInfo(spec=str(path), kind="single_file", file_size=path.stat().st_size)
    if hashes:
        info.sha256 = hashing.file_sha256(path)
        info.autov2 = info.sha256[:10]
        info.legacy_hash = hashing.legacy_hash(path)
    reader = CheckpointFile(path)
    if hashes and reader.metadata is not None and path.suffix.lower() == ".safetensors":
        info.model_hash = hashing.safetensors_model_hash(path)
    info.metadata = dict(reader.metadata)
    info.dtypes = reader.dtype_counts()
    info.parameters, info.other_tensors = _count(reader.shapes())
    info.family = family_from_keys(set(reader.keys()))
    if info.family is None:
        from sdtrain.models.file_kinds import describe_file

        described = describe_file(path, reader.shapes(), info.metadata)
        if described is not None:
            info.describes = described
            info.kind = str(described["kind"])
            info.family = described.get("base family")
            info.parameters = {"total": sum(_numel(s) for s in reader.shapes().values())}
            info.other_tensors = 0  # every tensor belongs to it (no EMA / buffers to skip)
            info.load_message = "not a base model; see `kind`"
            return info
        info.load_message = "no text encoder weights: not a full SD 1.x/2.x checkpoint"
        return info
    prediction, why = detect_prediction(None, reader, info.family)
    info.prediction_type, info.prediction_source = prediction, why
    try:
        folder, expected = choose_config(reader, info.family, prediction)
    except ModelLoadError as error:
        info.load_message = error.message
        return info
    info.loads = True
    info.load_message = f"all {len(expected)} weights of the {folder.name} layout are present"
    return info


def inspect_model(spec: str, *, hashes: bool = True) -> ModelInfo:
    """ModelInfo for any model spec. Folders, hub ids and builtins are loaded to be checked."""
    from sdtrain.config.sections import ModelSection
    from sdtrain.models.file_kinds import describe_state
    from sdtrain.models.load import load_bundle, source_kind

    state = describe_state(Path(spec).expanduser())
    if state is not None:
        info = ModelInfo(spec=spec, kind=str(state["kind"]), describes=state)
        info.load_message = "not a base model; resume a run with it"
        return info
    kind = source_kind(spec)
    if kind == "single_file":
        return inspect_single_file(Path(spec).expanduser(), hashes=hashes)
    info = ModelInfo(spec=spec, kind=kind)
    try:
        bundle = load_bundle(ModelSection(pretrained_model_name_or_path=spec))
    except SdtrainError as error:
        info.load_message = error.message
        return info
    info.family = bundle.family.name
    info.prediction_type = bundle.family.prediction_type
    info.prediction_source = "scheduler config" if kind != "builtin" else "built-in"
    for name in COMPONENT_PREFIXES:
        module = getattr(bundle, name)
        info.parameters[name] = sum(p.numel() for p in module.parameters())
        for tensor in module.state_dict().values():
            dtype = str(tensor.dtype).removeprefix("torch.")
            info.dtypes[dtype] = info.dtypes.get(dtype, 0) + 1
    info.loads = True
    info.load_message = "loaded"
    if bundle.source.path:
        info.spec = f"{spec} ({bundle.source.path})" if bundle.source.path != spec else spec
    return info


def _dominant(counts: dict[str, int]) -> str | None:
    floats = {
        k: v
        for k, v in counts.items()
        if k in ("float16", "bfloat16", "float32", "F16", "BF16", "F32")
    }
    return max(floats, key=lambda k: floats[k]) if floats else None


_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def source_dtypes(spec: str) -> tuple[str, str] | None:
    """(U-Net dtype, VAE dtype) names as stored in `spec` (headers only), or None if unknown.

    Single files count their tensors per component; diffusers folders (and builtins) read the
    headers of their unet/ and vae/ safetensors files.
    """
    from sdtrain.models.checkpoint_file import CheckpointFile
    from sdtrain.models.load import source_kind

    kind = source_kind(spec)
    found: dict[str, str | None] = {}
    if kind == "single_file":
        reader = CheckpointFile(Path(spec).expanduser())
        shapes_dtypes: dict[str, dict[str, int]] = {"unet": {}, "vae": {}}
        keys = reader.keys()
        for key in keys:
            for name in ("unet", "vae"):
                if key.startswith(COMPONENT_PREFIXES[name]):
                    dtype = _tensor_dtype(reader, key)
                    shapes_dtypes[name][dtype] = shapes_dtypes[name].get(dtype, 0) + 1
        found = {name: _dominant(counts) for name, counts in shapes_dtypes.items()}
    else:
        folder = _model_folder(spec, kind)
        for name in ("unet", "vae"):
            files = sorted((folder / name).glob("*.safetensors")) if folder else []
            found[name] = _dominant(CheckpointFile(files[0]).dtype_counts()) if files else None
    unet, vae = found.get("unet"), found.get("vae")
    if unet is None:
        return None
    return _DTYPE_NAMES.get(unet, unet), _DTYPE_NAMES.get(vae or unet, vae or unet)


def _tensor_dtype(reader: object, key: str) -> str:
    safe = getattr(reader, "_safe", None)
    if safe is not None:
        return str(safe.get_slice(key).get_dtype())
    return str(reader._tensors[key].dtype).removeprefix("torch.")  # type: ignore[attr-defined]


def _model_folder(spec: str, kind: str) -> Path | None:
    if kind == "builtin":
        from sdtrain.models.builtin import asset_folder, get_builtin

        folder = get_builtin(spec).folder
        return asset_folder(folder) if folder else None
    if kind == "diffusers":
        return Path(spec).expanduser()
    return None


def convert_model(
    src: str,
    dst: Path,
    *,
    to: str | None = None,
    precision: str | None = None,
    v2: bool | None = None,
    v_parameterization: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Load `src` (any spec) and write it as an LDM single file or a diffusers folder.

    Without `precision` the weights keep the source's dtypes (an fp16 file stays fp16; a VAE
    stored in fp32 beside an fp16 U-Net stays fp32): the model loads in them, nothing upcasts.
    """
    import torch

    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle
    from sdtrain.models.save import SINGLE_FILE_SUFFIXES, save_diffusers, save_single_file

    if to is None:
        to = "ldm" if dst.suffix.lower() in SINGLE_FILE_SUFFIXES else "diffusers"
    if to == "ldm" and dst.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{dst.name} has no single-file extension",
            hint="name the output .safetensors (or .ckpt), or use --to diffusers",
        )
    section = ModelSection(
        pretrained_model_name_or_path=src, v2=v2, v_parameterization=v_parameterization
    )
    dtype = torch.float32
    if precision is None:
        stored = source_dtypes(src)
        if stored is not None:
            dtype = getattr(torch, stored[0])
            section.no_half_vae = stored[1] == "float32"
    bundle = load_bundle(section, dtype=dtype)
    if to == "ldm":
        return save_single_file(bundle, dst, precision=precision, overwrite=overwrite)
    return save_diffusers(bundle, dst, precision=precision, overwrite=overwrite)
