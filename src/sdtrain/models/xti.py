"""XTI (Extended Textual Inversion, "P+"): one embedding per UNet cross-attention site.

An XTI token T with n vectors owns 16·n rows of the text encoder's `NewTokenRows` (layer-major:
rows [i·n, (i+1)·n) belong to site i, in `XTI_LAYERS` order). A prompt is tokenized once with
T's ordinary ids; site i's ids shift every new id by i·n, and the text encoder runs once on all
16 variants stacked in the batch. The 16 results reach the UNet as `Conditioning.layer_states`,
which the model family routes to the cross-attention processors (sdtrain.models.layer_states):
down blocks 0-2 take entries 0-5, the mid block entry 6, up blocks 1-3 entries 7-15, as the
reference's XTI UNet did, without patching UNet.forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdtrain.models.embeddings import XTI_LAYERS
from sdtrain.models.text import encode_tokens
from sdtrain.models.token_rows import layer_ids

SITES = len(XTI_LAYERS)
MID = XTI_LAYERS.index("MID")


@dataclass(frozen=True)
class XtiRows:
    """Where an XTI token's rows start (its first token id) and its vector count n."""

    first: int
    count: int

    def encode(
        self,
        text_encoder: Any,
        ids: torch.Tensor,
        clip_skip: int | None,
        eos_token_id: int,
        weights: torch.Tensor | None = None,
        renormalize: bool = False,
    ) -> list[torch.Tensor]:
        """16 conditionings (B, 75k+2, D), one per site, for token ids (B, k, 77)."""
        batch = ids.shape[0]
        stacked = layer_ids(ids, self.first, self.count, SITES).reshape(
            SITES * batch, *ids.shape[1:]
        )
        stacked_weights = None if weights is None else weights.repeat(SITES, 1, 1)
        states = encode_tokens(
            text_encoder,
            stacked,
            clip_skip,
            stacked_weights,
            eos_token_id=eos_token_id,
            renormalize=renormalize,
        )
        return list(states.split(batch))


def encode_prompt_layers(
    rows: XtiRows,
    tokenizer: Any,
    text_encoder: Any,
    prompt: str,
    clip_skip: int | None,
    max_token_length: int | None,
) -> list[torch.Tensor]:
    """16 conditionings (1, L, D) for one sample prompt, with A1111 weights (mean-preserving
    rescale, as sampling without XTI does)."""
    from sdtrain.data.prompt_weights import tokenize_weighted

    ids, weights = tokenize_weighted(tokenizer, [prompt], max_token_length)
    plain = bool((weights == 1.0).all())
    return rows.encode(
        text_encoder,
        ids,
        clip_skip,
        tokenizer.eos_token_id,
        None if plain else weights,
        renormalize=not plain,
    )
