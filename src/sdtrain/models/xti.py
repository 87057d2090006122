"""XTI (Extended Textual Inversion, "P+"): one embedding per UNet cross-attention site.

An XTI token T with n vectors owns S·n rows of the text encoder's `NewTokenRows` (S sites,
layer-major: rows [i·n, (i+1)·n) belong to site i, in site order; S = 16 for SD1/SD2, named
`XTI_LAYERS` as the reference). A prompt is tokenized once with T's ordinary ids; site i's ids
shift every new id by i·n, and the text encoder runs once on all S variants stacked in the batch.
The S results reach the UNet as `Conditioning.layer_states`, which the model family routes to
the cross-attention processors (sdtrain.models.layer_states): for SD1/SD2 down blocks 0-2 take
entries 0-5, the mid block entry 6, up blocks 1-3 entries 7-15, as the reference's XTI UNet did,
without patching UNet.forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdtrain.models.text import encode_tokens
from sdtrain.models.token_rows import layer_ids


def site_names(unet: Any) -> list[str]:
    """The UNet's cross-attention sites named by LDM block number, in site order: IN01 IN02 IN04
    IN05 IN07 IN08 MID OUT03 ... OUT11 for SD1/SD2 (the reference's names); smaller UNets get
    the same numbering (down level L, layer j -> IN{1 + L(k+1) + j}; up -> OUT{L(k+1) + j};
    k = layers_per_block)."""
    from sdtrain.models.layer_states import cross_attention_sites

    per = int(unet.config.layers_per_block) + 1
    names = []
    for site in cross_attention_sites(unet):
        parts = site.split(".")
        if parts[0] == "mid_block":
            names.append("MID")
            continue
        level, layer = int(parts[1]), int(parts[3])
        prefix, offset = ("IN", 1) if parts[0] == "down_blocks" else ("OUT", 0)
        names.append(f"{prefix}{offset + level * per + layer:02d}")
    if len(set(names)) != len(names):
        raise ValueError(f"cross-attention sites do not map to distinct XTI names: {names}")
    return names


def stack_sites(layers: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """(S, n, D) from site name -> (n, D), in the order of `names` (ValueError on a mismatch)."""
    if set(layers) != set(names):
        raise ValueError(f"the file's sites {sorted(layers)} differ from the UNet's {names}")
    return torch.stack([layers[name] for name in names])


@dataclass(frozen=True)
class XtiRows:
    """Where an XTI token's rows start (its first token id), its vector count n, and the site
    names (in site order) its row blocks belong to."""

    first: int
    count: int
    names: tuple[str, ...]

    @property
    def sites(self) -> int:
        return len(self.names)

    @property
    def mid(self) -> int:
        """Index of the mid-block site (its state doubles as the plain hidden states)."""
        return self.names.index("MID") if "MID" in self.names else len(self.names) // 2

    def encode(
        self,
        text_encoder: Any,
        ids: torch.Tensor,
        clip_skip: int | None,
        eos_token_id: int,
        weights: torch.Tensor | None = None,
        renormalize: bool = False,
    ) -> list[torch.Tensor]:
        """One conditioning (B, 75k+2, D) per site, for token ids (B, k, 77)."""
        batch = ids.shape[0]
        stacked = layer_ids(ids, self.first, self.count, self.sites).reshape(
            self.sites * batch, *ids.shape[1:]
        )
        stacked_weights = None if weights is None else weights.repeat(self.sites, 1, 1)
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
    """One conditioning (1, L, D) per site for one sample prompt, with A1111 weights
    (mean-preserving rescale, as sampling without XTI does)."""
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
