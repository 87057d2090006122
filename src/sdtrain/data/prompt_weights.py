"""A1111-style caption weights (§5.6): `(a)` ×1.1, `[a]` ÷1.1, `(a:1.3)`, and weighted token ids."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ROUND = 1.1
SQUARE = 1 / 1.1
CHUNK = 75  # content tokens per 77-token window
_ESCAPABLE = "()[]\\"
_SPECIAL = "\\()[]:"
_EXPLICIT = re.compile(r":([+-]?[.\d]+)\)")


def _lex(text: str) -> Iterator[tuple[str, str]]:
    """(kind, value) tokens: text, open_round, open_square, close_round, close_square, weight."""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt and nxt in _ESCAPABLE:
                yield "text", nxt
                i += 2
            else:  # a lone backslash is dropped, as in A1111
                yield "text", ""
                i += 1
        elif ch == "(":
            yield "open_round", ch
            i += 1
        elif ch == "[":
            yield "open_square", ch
            i += 1
        elif ch == ")":
            yield "close_round", ch
            i += 1
        elif ch == "]":
            yield "close_square", ch
            i += 1
        elif ch == ":":
            match = _EXPLICIT.match(text, i)
            if match:
                yield "weight", match.group(0)
                i = match.end()
            else:
                yield "text", ch
                i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIAL:
                j += 1
            yield "text", text[i:j]
            i = j


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a caption into (text, weight) runs, A1111-compatible (§5.6).

    `(a)` multiplies by 1.1, `[a]` divides by 1.1, `(a:1.3)` multiplies by 1.3; nesting
    multiplies. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters. Openers left unclosed
    apply to the rest of the text; unmatched closers are literal. Neighbouring runs with equal
    weights are merged; an empty caption gives [("", 1.0)].

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for kind, value in _lex(text):
        if kind == "open_round":
            round_open.append(len(runs))
        elif kind == "open_square":
            square_open.append(len(runs))
        elif kind == "weight" and round_open:
            try:
                factor = float(value[1:-1])
            except ValueError:  # e.g. "(a:1.2.3)": keep it as text (the reference crashes)
                runs.append([value, 1.0])
            else:
                multiply(round_open.pop(), factor)
        elif kind == "close_round" and round_open:
            multiply(round_open.pop(), ROUND)
        elif kind == "close_square" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            runs.append([value, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not runs:
        return [("", 1.0)]
    merged: list[list[Any]] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(str(t), float(w)) for t, w in merged]


def token_budget(max_token_length: int | None) -> int:
    """Ids per caption incl. BOS/EOS: 77 for None/75, 152 for 150, 227 for 225."""
    if max_token_length is None:
        return CHUNK + 2
    if max_token_length <= 0 or max_token_length % CHUNK:
        raise ValueError(f"max_token_length must be 75, 150 or 225, got {max_token_length}")
    return max_token_length + 2


def weighted_token_row(
    tokenizer: Any, caption: str, budget: int
) -> tuple[list[int], list[float], bool]:
    """Ids and weights of one caption laid out as `[BOS] + tokens + [EOS] + [PAD]...` (len budget).

    Each run is tokenized without BOS/EOS and its weight repeated per token; content past
    budget − 2 tokens is cut (third value True). Specials and padding weigh 1.0.
    """
    limit = budget - 2
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_attention(caption):
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        tokens += ids
        weights += [weight] * len(ids)
        if len(tokens) > limit:
            break
    truncated = len(tokens) > limit
    tokens, weights = tokens[:limit], weights[:limit]
    fill = limit - len(tokens)
    row = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [
        tokenizer.pad_token_id
    ] * fill
    return row, [1.0, *weights, 1.0] + [1.0] * fill, truncated


def _windows(row: list[int], weights: list[float], bos: int, eos: int, pad: int):
    """Split one row into n 77-token windows as §5.3 (with SD2's EOS fix-ups when pad != eos)."""
    n = (len(row) - 2) // CHUNK
    ids_out, weights_out = [], []
    for k in range(n):
        window = [row[0], *row[1 + CHUNK * k : 1 + CHUNK * (k + 1)], row[-1]]
        if pad != eos:
            if window[-2] not in (eos, pad):  # content continues past this window
                window[-1] = eos
            if window[1] == pad:  # empty window: BOS EOS PAD ...
                window[1] = eos
        ids_out.append(window)
        weights_out.append([1.0, *weights[1 + CHUNK * k : 1 + CHUNK * (k + 1)], 1.0])
    return ids_out, weights_out


def tokenize_weighted(
    tokenizer: Any, captions: Sequence[str], max_token_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, n, 77) long and weights (B, n, 77) float32 for weighted captions (§5.6).

    n = 1 for max_token_length None/75, 2 for 150, 3 for 225. Weights of window k are the
    content weights 1+75k .. 75+75k with 1.0 at BOS/EOS/padding. Logs "Prompt was truncated"
    when a caption exceeds the budget. `tokenizer` is a CLIPTokenizer (or anything with the
    same call and bos/eos/pad ids).
    """
    import torch

    budget = token_budget(max_token_length)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    all_ids, all_weights, truncated = [], [], False
    for caption in captions:
        row, weights, cut = weighted_token_row(tokenizer, caption, budget)
        truncated = truncated or cut
        if budget == CHUNK + 2:
            all_ids.append([row])
            all_weights.append([weights])
        else:
            ids_w, weights_w = _windows(row, weights, bos, eos, pad)
            all_ids.append(ids_w)
            all_weights.append(weights_w)
    if truncated:
        logger.warning("Prompt was truncated: a weighted caption exceeds %d tokens", budget - 2)
    return (
        torch.tensor(all_ids, dtype=torch.long),
        torch.tensor(all_weights, dtype=torch.float32),
    )
