"""Replacement VAE (`vae = ...`): VAE-only file (LDM/diffusers keys), full checkpoint or folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sdtrain.errors import ModelLoadError
from sdtrain.models.checkpoint_file import CheckpointFile
from sdtrain.models.ldm_keys import VAE_PREFIX, vae_to_ldm

# Old diffusers VAE attention names (before 0.17) -> current ones.
_OLD_ATTENTION = (
    (".query.", ".to_q."),
    (".key.", ".to_k."),
    (".value.", ".to_v."),
    (".proj_attn.", ".to_out.0."),
)


def _expected(base_config: dict) -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL.from_config(base_config)
    return {k: tuple(v.shape) for k, v in vae_to_ldm(model.state_dict(), model.config).items()}


def _from_ldm(state: dict[str, torch.Tensor], base, where: str, dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    expected = _expected(dict(base.config))
    missing = sorted(key for key in expected if key not in state)
    wrong = sorted(k for k, s in expected.items() if k in state and tuple(state[k].shape) != s)
    if missing or wrong:
        shown = (missing or wrong)[:6]
        raise ModelLoadError(
            f"{where} does not fit the base model's VAE "
            f"({'missing' if missing else 'wrong shape'}: {', '.join(shown)}"
            f"{' ...' if len(missing or wrong) > 6 else ''})",
            hint="use an SD 1.x/2.x VAE (same architecture as the base model)",
        )
    with tempfile.TemporaryDirectory() as tmp:
        base.save_config(Path(tmp) / "vae")
        vae = AutoencoderKL.from_single_file(
            {k: state[k] for k in expected},
            config=tmp,
            subfolder="vae",
            local_files_only=True,
            torch_dtype=dtype,
        )
    return vae


def _from_diffusers_keys(state: dict[str, torch.Tensor], base, where: str, dtype):
    from diffusers import AutoencoderKL

    fixed = {}
    for key, value in state.items():
        for old, new in _OLD_ATTENTION:
            if ".mid_block.attentions." in key and old in key:
                key = key.replace(old, new)
        if (
            ".mid_block.attentions." in key
            and value.dim() == 4
            and key.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))
        ):
            value = value[:, :, 0, 0]
        fixed[key] = value
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(dict(base.config))
    try:
        vae.load_state_dict(fixed, strict=True, assign=True)
    except RuntimeError as error:
        raise ModelLoadError(
            f"{where} does not fit the base model's VAE: {error}",
            hint="use an SD 1.x/2.x VAE (same architecture as the base model)",
        ) from error
    return vae.to(dtype) if dtype is not None else vae


def load_vae(spec: str, base, dtype: torch.dtype | None = None):
    """An AutoencoderKL for `spec`, with the architecture of `base` (the bundle's own VAE).

    Accepted: a diffusers folder (with or without a `vae/` subfolder), a hub id from the local
    cache, a full SD checkpoint (`first_stage_model.*` keys are used), a bare LDM VAE file
    (`encoder.down.*`), or a diffusers-keyed VAE file (`encoder.down_blocks.*`, also `.bin`).
    """
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} holds no VAE config.json", hint="pass a VAE folder or file"
            )
        try:
            kwargs = {"subfolder": sub} if sub else {}
            return AutoencoderKL.from_pretrained(
                str(path), local_files_only=True, torch_dtype=dtype, **kwargs
            ).eval()
        except Exception as error:
            raise ModelLoadError(f"cannot load the VAE in {path}: {error}") from error
    if not path.exists() and "/" in spec and not spec.startswith((".", "/", "~")):
        from sdtrain.models.hub import resolve_hub

        return load_vae(str(resolve_hub(spec, vae_only=True)), base, dtype)
    reader = CheckpointFile(path)
    keys = reader.keys()
    if any(key.startswith(VAE_PREFIX) for key in keys):
        vae = _from_ldm(reader.tensors(VAE_PREFIX), base, str(path), dtype)
    elif any(key.startswith(("encoder.down.", "decoder.up.")) for key in keys):
        state = {VAE_PREFIX + k: v for k, v in reader.tensors(("encoder.", "decoder.")).items()}
        state.update({VAE_PREFIX + k: v for k, v in reader.tensors("quant_conv.").items()})
        state.update({VAE_PREFIX + k: v for k, v in reader.tensors("post_quant_conv.").items()})
        vae = _from_ldm(state, base, str(path), dtype)
    elif any(key.startswith("encoder.down_blocks.") for key in keys):
        prefixes = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        vae = _from_diffusers_keys(reader.tensors(prefixes), base, str(path), dtype)
    else:
        raise ModelLoadError(
            f"{path} contains no VAE weights",
            hint="pass a VAE file, a full SD checkpoint or a diffusers VAE folder",
        )
    reader.close()
    return vae.eval()
