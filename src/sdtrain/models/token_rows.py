"""New token rows for a text encoder, kept apart from its frozen embedding matrix.

Textual inversion trains only the rows of the tokens it adds. Instead of growing the embedding
matrix and restoring every other row after each step (the reference), the text encoder's token
embedding is replaced (through transformers' `set_input_embeddings`) by `NewTokenRows`: the
original `nn.Embedding` untouched, plus a small parameter for ids >= its size. Rows below that can
therefore never change (they are not in the optimizer and get no gradient), the base matrix can
stay in the file's precision, and the trainable part is (R, D) instead of the whole vocabulary.

R can exceed the number of token strings added: XTI keeps 16 rows per token (one per UNet
cross-attention site) and selects layer i by shifting the new ids by i * n (`layer_ids`).
"""

from __future__ import annotations

from typing import Any

import torch


class NewTokenRows(torch.nn.Module):
    """`base(ids)` for ids < base.num_embeddings, `rows[ids - first]` for the new ones."""

    def __init__(self, base: torch.nn.Embedding, rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.first = base.num_embeddings
        self.rows = torch.nn.Parameter(rows.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The base matrix (callers that read the width or dtype of the input embeddings)."""
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first
        out = self.base(ids.masked_fill(new, 0))
        extra = torch.nn.functional.embedding((ids - self.first).clamp(min=0), self.rows)
        return torch.where(new.unsqueeze(-1), extra.to(out.dtype), out)


def taken_tokens(tokenizer: Any, names: list[str]) -> list[str]:
    """The token strings of `names` the tokenizer already has (case-insensitive, as CLIP)."""
    vocab = tokenizer.get_vocab()
    return [
        name for name in names if name in vocab or name.lower() in vocab or f"{name}</w>" in vocab
    ]


def word_ids(tokenizer: Any, word: str) -> list[int]:
    """The ids of `word` without BOS/EOS; [] when it has no known token (empty, or unknown
    pieces only), so callers can refuse it by name."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    unknown = tokenizer.unk_token_id
    if unknown is not None and unknown in ids and tokenizer.unk_token not in word:
        return []
    return list(ids)


def install_rows(
    tokenizer: Any, text_encoder: Any, names: list[str], rows: torch.Tensor
) -> NewTokenRows:
    """Add `names` to the tokenizer (consecutive ids after the vocabulary) and give the text
    encoder a NewTokenRows holding `rows` (R >= len(names), D). Returns the module; its `rows`
    parameter is what trains. The caller has checked `taken_tokens` (ValueError otherwise)."""
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, NewTokenRows):
        raise ValueError("the text encoder already has new token rows")
    if rows.ndim != 2 or rows.shape[1] != embedding.weight.shape[1] or len(rows) < len(names):
        raise ValueError(f"rows {tuple(rows.shape)} do not fit {len(names)} token(s)")
    first = len(tokenizer)
    if first != embedding.num_embeddings:
        raise ValueError(
            f"tokenizer has {first} tokens but the text encoder {embedding.num_embeddings} rows"
        )
    added = tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if added != len(names) or ids != list(range(first, first + len(names))):
        raise ValueError(f"could not add {names} as new consecutive tokens")
    module = NewTokenRows(embedding, rows.to(embedding.weight.device))
    text_encoder.set_input_embeddings(module)
    return module


def layer_ids(ids: torch.Tensor, first: int, count: int, layers: int) -> torch.Tensor:
    """(layers, *ids.shape): ids with every new id (>= first) shifted by layer * count, the row
    block of that layer (XTI)."""
    new = ids >= first
    shifts = torch.arange(layers, device=ids.device).view(-1, *([1] * ids.ndim)) * count
    return torch.where(new.unsqueeze(0), ids.unsqueeze(0) + shifts, ids.unsqueeze(0))
