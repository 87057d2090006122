"""Textual-inversion embeddings: read and write sdtrain/kohya/A1111/XTI files, add tokens.

Token semantics follow the reference (§8.1, §8.4): an embedding with n vectors for token T adds the
tokens `T, T1, ..., T(n-1)` at the end of the vocabulary, and a prompt's `T` is expanded to
"T T1 ... T(n-1)". The token of a file is its stem (kohya's gen_img and A1111 convention).

File forms written (`write_embedding` / `write_xti`):
- `.safetensors`: one tensor `emb_params` (n, D) plus modelspec metadata (the default);
- `.pt` / `.ckpt`: `torch.save({"emb_params": (n, D)})`, tensors only (weights_only loadable);
- A1111 `.pt`: `{"string_to_token": {"*": 265}, "string_to_param": {"*": (n, D)}, "name": T,
  "step": S, "sd_checkpoint": None, "sd_checkpoint_name": None}` (plain types only);
- XTI (P+): `.safetensors` with the 16 cross-attention site names (`XTI_LAYERS`) as keys, each
  (n, D), in the reference's order (§8.5), plus modelspec metadata.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtrain.errors import ModelLoadError

if TYPE_CHECKING:
    from sdtrain.models.bundle import ModelBundle

EMB_KEY = "emb_params"  # sdtrain / kohya safetensors and .pt
A1111_KEY = "string_to_param"  # AUTOMATIC1111 .pt: {"string_to_param": {"*": (n, D)}, ...}
TORCH_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
# The UNet cross-attention sites of SD1/SD2 in the reference's XTI order (§8.5); sorted
# alphabetically this is the same order.
XTI_LAYERS = (
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)  # fmt: skip


def _bad(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: not a usable textual-inversion embedding ({why})",
        hint="give an sdtrain/kohya .safetensors (emb_params) or an A1111 .pt embedding",
    )


def _from_mapping(path: Path, data: Any) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if not isinstance(data, dict):
        raise _bad(path, f"holds a {type(data).__name__}")
    if A1111_KEY in data:
        table = data[A1111_KEY]
        if not isinstance(table, dict) or not table:
            raise _bad(path, f"empty {A1111_KEY}")
        return next(iter(table.values()))
    if EMB_KEY in data:
        return data[EMB_KEY]
    tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:  # diffusers' learned_embeds {token: tensor} and other one-tensor files
        return tensors[0]
    if len(tensors) == len(XTI_LAYERS):
        raise _bad(path, "an XTI (16-layer) embedding; load it with read_xti")
    raise _bad(path, f"found keys {sorted(map(str, data))[:6]} but no {EMB_KEY} / {A1111_KEY}")


def _load(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"embedding file not found: {path}", hint="check the embedding path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in TORCH_SUFFIXES:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickled code, ...
        raise _bad(path, f"cannot read it: {error}") from error
    raise _bad(path, f"unknown file type '{path.suffix}'")


def is_xti(path: str | Path) -> bool:
    """True for an XTI file: a safetensors whose tensors are the 16 XTI layer names (or, as the
    reference accepts, any 16 tensors)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception:
        return False
    return set(keys) == set(XTI_LAYERS) or (len(keys) == len(XTI_LAYERS) and EMB_KEY not in keys)


def read_xti(path: str | Path) -> torch.Tensor:
    """The vectors (16, n, D) float32 of an XTI file, in XTI_LAYERS order (a file without the
    layer names: its 16 tensors in the order safetensors lists them, as the reference)."""
    path = Path(path)
    data = _load(path)
    if not isinstance(data, dict) or len(data) != len(XTI_LAYERS):
        count = len(data) if isinstance(data, dict) else 0
        raise _bad(path, f"an XTI file holds 16 tensors, one per layer; this one has {count}")
    keys = list(XTI_LAYERS) if set(data) == set(XTI_LAYERS) else list(data)
    layers = [data[key] if data[key].ndim == 2 else data[key].reshape(1, -1) for key in keys]
    if len({tuple(layer.shape) for layer in layers}) != 1:
        raise _bad(path, "its 16 layer tensors differ in shape")
    return torch.stack(layers).detach().float()


def read_embedding(path: str | Path) -> torch.Tensor:
    """The vectors (n, D) float32 of an embedding file (a 1-D vector becomes (1, D)).

    .safetensors: `emb_params`, else the file's only tensor. .pt/.ckpt/.bin: A1111's
    `string_to_param` (first entry), `emb_params`, or a one-tensor dict; loaded with
    `torch.load(weights_only=True)`, never by unpickling arbitrary objects.
    """
    path = Path(path)
    vectors = _from_mapping(path, _load(path))
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise _bad(path, f"tensor shape {tuple(vectors.shape)} is not (n, D)")
    return vectors.detach().float()


def write_embedding(
    path: str | Path,
    vectors: torch.Tensor,
    *,
    token: str,
    metadata: dict[str, str] | None = None,
    a1111: bool = False,
    step: int = 0,
) -> Path:
    """Write `vectors` (n, D) atomically in the form the suffix (and `a1111`) asks for.

    `.safetensors`: `emb_params` + `metadata`; `.pt`/`.ckpt`: `{"emb_params": ...}`, or with
    `a1111` the AUTOMATIC1111 dict naming `token` at `step`. The tensor keeps its dtype.
    """
    from sdtrain.atomic import save_safetensors, save_torch

    path = Path(path)
    tensor = vectors.detach().cpu().contiguous()
    if path.suffix == ".safetensors":
        if a1111:
            raise ValueError("the A1111 string_to_param form is a .pt file")
        save_safetensors(path, {EMB_KEY: tensor}, metadata)
    elif path.suffix in (".pt", ".ckpt"):
        obj: dict[str, Any] = {EMB_KEY: tensor}
        if a1111:
            obj = {
                "string_to_token": {"*": 265},
                A1111_KEY: {"*": tensor},
                "name": token,
                "step": int(step),
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
            }
        save_torch(path, obj)
    else:
        raise ValueError(f"unknown embedding file type {path.suffix!r}")
    return path


def write_xti(path: str | Path, layers: torch.Tensor, metadata: dict[str, str] | None) -> Path:
    """Write XTI vectors (16, n, D) as a safetensors keyed by XTI_LAYERS (atomically)."""
    from sdtrain.atomic import save_safetensors

    if layers.ndim != 3 or layers.shape[0] != len(XTI_LAYERS):
        raise ValueError(f"XTI vectors must be (16, n, D), got {tuple(layers.shape)}")
    tensors = {name: layers[i].detach().cpu().contiguous() for i, name in enumerate(XTI_LAYERS)}
    save_safetensors(Path(path), tensors, metadata)
    return Path(path)


def token_strings(token: str, count: int) -> list[str]:
    """`[T, T1, ..., T(count-1)]`, the reference's names for a multi-vector token."""
    return [token] + [f"{token}{i}" for i in range(1, count)]


def add_embedding(bundle: ModelBundle, token: str, vectors: torch.Tensor) -> list[str]:
    """Add `token`'s vectors (n, D) as new tokens of the bundle's tokenizer and text encoder.

    The n token strings must all be new (ModelLoadError otherwise) and get consecutive ids at the
    end of the vocabulary; the text encoder's embedding matrix is resized and the new rows set.
    Returns the token strings.
    """
    width = bundle.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        raise ModelLoadError(
            f"embedding '{token}' has vectors of width {vectors.shape[1]}, the model's text "
            f"encoder has {width}",
            hint="use an embedding trained for this model family (768: SD1, 1024: SD2)",
        )
    names = token_strings(token, vectors.shape[0])
    tokenizer = bundle.tokenizer
    vocab = tokenizer.get_vocab()
    taken = [name for name in names if name in vocab or name.lower() in vocab]
    if taken:
        raise ModelLoadError(
            f"embedding token(s) {', '.join(taken)} already exist in the tokenizer",
            hint="rename the embedding file (its stem is the token) to a word that is not a token",
        )
    first = len(tokenizer)
    added = tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if added != len(names) or ids != list(range(first, first + len(names))):
        raise ModelLoadError(
            f"could not add the tokens of embedding '{token}' to the tokenizer",
            hint="rename the embedding file to a plain, unused word",
        )
    bundle.text_encoder.resize_token_embeddings(len(tokenizer))
    weight = bundle.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = vectors.to(device=weight.device, dtype=weight.dtype)
    return names


def expand_tokens(text: str, token: str, names: list[str]) -> str:
    """Replace each whole-word `token` in `text` by "T T1 ... T(n-1)" (n = len(names)).

    Whole words only, case-insensitive like the CLIP tokenizer (kohya's gen_img replaced
    substrings, so `cat` also changed `category`).
    """
    if len(names) < 2:
        return text
    joined = " ".join(names)
    return _token_re(token).sub(lambda _: joined, text)


def contains_token(text: str, token: str) -> bool:
    """Whether `text` has `token` as a whole word (case-insensitive), as expand_tokens sees it."""
    return _token_re(token).search(text) is not None


def _token_re(token: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(token)}(?!\w)", flags=re.IGNORECASE)
