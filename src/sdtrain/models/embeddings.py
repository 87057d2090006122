"""Textual-inversion embeddings: read and write sdtrain/kohya/A1111/XTI files, add tokens.

Token semantics follow the reference (§8.1, §8.4): an embedding with n vectors for token T adds the
tokens `T, T1, ..., T(n-1)` at the end of the vocabulary, and a prompt's `T` is expanded to
"T T1 ... T(n-1)". The token of a file is its stem (kohya's gen_img and A1111 convention).

File forms written (`write_embedding` / `write_xti`):
- `.safetensors`: one tensor `emb_params` (n, D) plus modelspec metadata (the default);
- `.pt` / `.ckpt`: `torch.save({"emb_params": (n, D)})`, tensors only (weights_only loadable);
- A1111 `.pt`: `{"string_to_token": {"*": 265}, "string_to_param": {"*": (n, D)}, "name": T,
  "step": S, "sd_checkpoint": None, "sd_checkpoint_name": None}` (plain types only);
- XTI (P+): `.safetensors` with the cross-attention site names as keys, each (n, D): for SD1/SD2
  the reference's 16 (`XTI_LAYERS`, §8.5); smaller UNets (the toy models) name their sites by
  the same LDM block numbering (sdtrain.models.xti.site_names). Plus modelspec metadata.
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
# alphabetically this is the same order. Any XTI site name matches XTI_NAME.
XTI_LAYERS = (
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)  # fmt: skip
XTI_NAME = re.compile(r"^(IN\d\d|MID|OUT\d\d)$")


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
            from sdtrain.models.torch_file import load_weights_only

            return load_weights_only(path, "embedding file")
    except ModelLoadError:
        raise
    except Exception as error:  # corrupt file, ...
        raise _bad(path, f"cannot read it: {error}") from error
    raise _bad(path, f"unknown file type '{path.suffix}'")


def is_xti(path: str | Path) -> bool:
    """True for an XTI file: a safetensors keyed by XTI site names (with MID), or, as the
    reference accepts, any 16 tensors."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception:
        return False
    named = "MID" in keys and all(XTI_NAME.match(key) for key in keys)
    return named or (len(keys) == len(XTI_LAYERS) and EMB_KEY not in keys)


def read_xti(path: str | Path) -> dict[str, torch.Tensor]:
    """The vectors of an XTI file: site name -> (n, D) float32, in site order. A file of 16
    unnamed tensors gets the reference's names in the order safetensors lists them."""
    path = Path(path)
    data = _load(path)
    if not isinstance(data, dict) or not is_xti(path):
        raise _bad(path, "not an XTI file (keys IN01 ... MID ... OUT11, one tensor per site)")
    if not all(XTI_NAME.match(key) for key in data):
        data = dict(zip(XTI_LAYERS, data.values(), strict=True))
    layers = {
        key: (value if value.ndim == 2 else value.reshape(1, -1)).detach().float()
        for key, value in sorted(data.items())
    }
    if len({tuple(layer.shape) for layer in layers.values()}) != 1:
        raise _bad(path, "its site tensors differ in shape")
    return layers


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


def write_xti(
    path: str | Path, layers: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> Path:
    """Write XTI vectors (site name -> (n, D)) as a safetensors (atomically)."""
    from sdtrain.atomic import save_safetensors

    if "MID" not in layers or not all(XTI_NAME.match(key) for key in layers):
        raise ValueError(f"XTI site names expected, got {sorted(layers)}")
    tensors = {name: value.detach().cpu().clone() for name, value in layers.items()}
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
    bundle.embeddings.names[token] = names
    return names


def add_xti_embedding(
    bundle: ModelBundle, token: str, layers: dict[str, torch.Tensor]
) -> list[str]:
    """Add an XTI embedding (site name -> (n, D)): tokens T, T1, ... whose per-site row blocks
    live in a NewTokenRows module; prompts then condition each UNet site on its own block. One
    XTI embedding per bundle, added after every plain embedding."""
    from sdtrain.models.token_rows import install_rows, taken_tokens
    from sdtrain.models.xti import XtiRows, site_names, stack_sites

    if bundle.embeddings.xti is not None:
        raise ModelLoadError(
            f"XTI embedding '{token}': only one XTI embedding can be loaded at a time",
            hint="pass one XTI file (plain embeddings can be added alongside)",
        )
    sites = site_names(bundle.unet)
    try:
        stacked = stack_sites(layers, sites)
    except ValueError as error:
        raise ModelLoadError(
            f"XTI embedding '{token}' does not fit this UNet: {error}",
            hint="use an XTI embedding trained for this model family",
        ) from error
    width = bundle.text_encoder.get_input_embeddings().weight.shape[1]
    if stacked.shape[-1] != width:
        raise ModelLoadError(
            f"XTI embedding '{token}' has vectors of width {stacked.shape[-1]}, the model's "
            f"text encoder has {width}",
            hint="use an embedding trained for this model family (768: SD1, 1024: SD2)",
        )
    names = token_strings(token, stacked.shape[1])
    taken = taken_tokens(bundle.tokenizer, names)
    if taken:
        raise ModelLoadError(
            f"embedding token(s) {', '.join(taken)} already exist in the tokenizer",
            hint="rename the embedding file (its stem is the token) to a word that is not a token",
        )
    first = len(bundle.tokenizer)
    install_rows(bundle.tokenizer, bundle.text_encoder, names, stacked.reshape(-1, width))
    bundle.embeddings.names[token] = names
    bundle.embeddings.xti = XtiRows(first, stacked.shape[1], tuple(sites))
    return names


def expand_all(text: str, names: dict[str, list[str]]) -> str:
    """expand_tokens for every embedding token of a bundle (`bundle.embeddings.names`)."""
    for token, strings in names.items():
        text = expand_tokens(text, token, strings)
    return text


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
