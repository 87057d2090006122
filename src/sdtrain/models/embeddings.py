"""Textual-inversion embeddings: read sdtrain/kohya/A1111 files, add their tokens to a bundle.

Token semantics follow the reference (§8.1, §8.4): an embedding with n vectors for token T adds the
tokens `T, T1, ..., T(n-1)` at the end of the vocabulary, and a prompt's `T` is expanded to
"T T1 ... T(n-1)". The token of a file is its stem (kohya's gen_img and A1111 convention).
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
    if len(tensors) == 16:
        raise _bad(path, "an XTI (16-layer) embedding; XTI is not supported")
    raise _bad(path, f"found keys {sorted(map(str, data))[:6]} but no {EMB_KEY} / {A1111_KEY}")


def read_embedding(path: str | Path) -> torch.Tensor:
    """The vectors (n, D) float32 of an embedding file (a 1-D vector becomes (1, D)).

    .safetensors: `emb_params`, else the file's only tensor. .pt/.ckpt/.bin: A1111's
    `string_to_param` (first entry), `emb_params`, or a one-tensor dict; loaded with
    `torch.load(weights_only=True)`, never by unpickling arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"embedding file not found: {path}", hint="check the --embedding path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        elif path.suffix in TORCH_SUFFIXES:
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise _bad(path, f"unknown file type '{path.suffix}'")
    except ModelLoadError:
        raise
    except Exception as error:  # corrupt file, pickled code, ...
        raise _bad(path, f"cannot read it: {error}") from error
    vectors = _from_mapping(path, data)
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise _bad(path, f"tensor shape {tuple(vectors.shape)} is not (n, D)")
    return vectors.detach().float()


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
    pattern = rf"(?<!\w){re.escape(token)}(?!\w)"
    joined = " ".join(names)
    return re.sub(pattern, lambda _: joined, text, flags=re.IGNORECASE)
