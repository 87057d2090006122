"""Caption -> token ids (75-token chunks) -> conditioning (clip skip, long prompts, weights)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sdtrain.data.prompt_weights import CHUNK, token_budget
from sdtrain.models.host_copy import to_device

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

EOS_ID = 49407  # <|endoftext|> in the CLIP vocabulary (SD1 and SD2)
WINDOW = CHUNK + 2  # BOS + 75 content tokens + EOS/PAD


def _chunk(ids: torch.Tensor, pad_id: int, eos_id: int) -> torch.Tensor:
    """(B, 75n+2) ids -> (B, n, 77) windows with the reference's SD2 fix-ups (§5.3)."""
    n = (ids.shape[1] - 2) // CHUNK
    bos = ids[:, :1]
    last = ids[:, -1:]
    windows = []
    for k in range(n):
        window = torch.cat([bos, ids[:, 1 + CHUNK * k : 1 + CHUNK * (k + 1)], last], dim=1)
        if pad_id != eos_id and n > 1:
            window = window.clone()
            # a content token continues past this window: close the window with EOS
            open_end = (window[:, -2] != eos_id) & (window[:, -2] != pad_id)
            window[:, -1] = torch.where(
                open_end, torch.full_like(window[:, -1], eos_id), window[:, -1]
            )
            # an empty window (BOS PAD PAD ...) becomes BOS EOS PAD ...
            empty = window[:, 1] == pad_id
            window[:, 1] = torch.where(empty, torch.full_like(window[:, 1], eos_id), window[:, 1])
        windows.append(window)
    return torch.stack(windows, dim=1)


def tokenize(
    tokenizer: CLIPTokenizer, captions: Sequence[str], max_token_length: int | None
) -> torch.Tensor:
    """Token ids (B, n, 77) for captions, chunked exactly as the reference (§5.3).

    Captions longer than the budget (75 / 150 / 225 content tokens) are truncated silently, as in
    the reference. n = 1 without `max_token_length` (or 75), 2 for 150, 3 for 225. Weighted
    captions are tokenized by `sdtrain.data.prompt_weights.tokenize_weighted` (same layout).
    """
    budget = token_budget(max_token_length)
    ids = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=budget,
        return_tensors="pt",
    ).input_ids
    if budget == WINDOW:
        return ids.unsqueeze(1)
    return _chunk(ids, tokenizer.pad_token_id, tokenizer.eos_token_id)


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text model's final LayerNorm (transformers >= 5.6 flattened CLIPTextModel, or older)."""
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = text_encoder.text_model.final_layer_norm
    return norm


def _merge_windows(states: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n*77, D) -> (B, 75n+2, D): BOS of window 0, inner 75 of each window, last state."""
    if n == 1:
        return states
    parts = [states[:, :1]]
    parts += [states[:, WINDOW * k + 1 : WINDOW * k + 1 + CHUNK] for k in range(n)]
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


def _merge_weights(weights: torch.Tensor) -> torch.Tensor:
    """(B, n, 77) -> (B, 75n+2): 1.0 on the outer BOS/EOS, window k's [1:76] in between."""
    ones = torch.ones_like(weights[:, 0, :1])
    return torch.cat([ones, weights[:, :, 1 : 1 + CHUNK].flatten(1), ones], dim=1)


def encode_tokens(
    text_encoder: CLIPTextModel,
    ids: torch.Tensor,
    clip_skip: int | None = None,
    weights: torch.Tensor | None = None,
    *,
    eos_token_id: int = EOS_ID,
    renormalize: bool = False,
) -> torch.Tensor:
    """Text conditioning (B, 75n+2, D) from ids (B, n, 77), as the reference (§5.4, §5.6).

    clip_skip None/1 = last hidden state; k > 1 = hidden_states[-k] followed by the model's final
    LayerNorm (computed here: diffusers' `clip_skip` path is broken with transformers >= 5.6).
    For n > 1 the windows are re-joined into one sequence. In an empty window after the first
    whose padding is not EOS (SD2: ids BOS EOS PAD ...), the EOS state is replaced by the following
    PAD state: the reference meant to do this but compared an id with the EOS *string*, so its fix
    never ran ([bug] §13.24; fixed here on purpose). SD1 windows pad with EOS and are unaffected.
    `weights` (B, n, 77) multiply the states position-wise (no mean renormalisation, as in the
    reference's training); `renormalize=True` rescales each prompt to keep its original mean
    (the reference's sampling pipeline behaviour).
    """
    batch, n, length = ids.shape
    if length != WINDOW:
        raise ValueError(f"expected ids of shape (B, n, {WINDOW}), got {tuple(ids.shape)}")
    device = next(text_encoder.parameters()).device
    host = ids.reshape(batch * n, WINDOW)
    flat = to_device(host, device)
    if clip_skip is None or clip_skip == 1:
        states = text_encoder(flat).last_hidden_state
    else:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states
        states = final_layer_norm(text_encoder)(hidden[-clip_skip])
    if n > 1:  # the ids where they came from (the host, in training): no device read
        empty = ((host[:, 1] == eos_token_id) & (host[:, 2] != eos_token_id)).reshape(batch, n)
        empty[:, 0] = False
        if empty.any():
            states = states.clone()  # (a mask on the states' device: no blocking index copy)
            fix = to_device(empty.reshape(-1, 1), states.device)
            states[:, 1] = torch.where(fix, states[:, 2], states[:, 1])
    states = _merge_windows(states.reshape(batch, n * WINDOW, -1), n)
    if weights is None:
        return states
    merged = _merge_weights(to_device(weights, device, states.dtype)).unsqueeze(-1)
    if not renormalize:
        return states * merged
    before = states.float().mean(dim=(-2, -1))
    weighted = states * merged
    after = weighted.float().mean(dim=(-2, -1))
    return weighted * (before / after).to(states.dtype)[:, None, None]


def encode_captions(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    captions: Sequence[str],
    max_token_length: int | None = None,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """tokenize + encode_tokens with the tokenizer's own EOS id -> (B, 75n+2, D)."""
    ids = tokenize(tokenizer, captions, max_token_length)
    return encode_tokens(text_encoder, ids, clip_skip, eos_token_id=tokenizer.eos_token_id)
