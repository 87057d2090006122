"""Caption -> text conditioning, shared by every method (clip skip, long prompts, weights)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sdtrain.data.plan import Plan
    from sdtrain.models.bundle import ModelBundle


@dataclass(frozen=True)
class TextConditioning:
    """How captions become UNet conditioning in training (§5.3-§5.6).

    weighted: A1111-style `(word:1.2)` weights in captions, applied position-wise without mean
    renormalisation (as the reference's training does).
    """

    clip_skip: int | None = None
    max_token_length: int | None = None
    weighted: bool = False

    def encode(self, bundle: ModelBundle, captions: Sequence[str], grad: bool) -> torch.Tensor:
        """(B, 75n+2, D); without an autograd graph unless `grad` (a trained text encoder)."""
        import torch

        from sdtrain.models.text import encode_tokens, tokenize

        weights = None
        if self.weighted:
            from sdtrain.data.prompt_weights import tokenize_weighted

            ids, weights = tokenize_weighted(
                bundle.tokenizer, list(captions), self.max_token_length
            )
        else:
            ids = tokenize(bundle.tokenizer, captions, self.max_token_length)
        with contextlib.nullcontext() if grad else torch.no_grad():
            return encode_tokens(
                bundle.text_encoder,
                ids,
                self.clip_skip,
                weights,
                eos_token_id=bundle.tokenizer.eos_token_id,
            )


_CAPTION_RANDOMNESS = (
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "enable_wildcard",
    "token_warmup_step",
)


def static_captions(plan: Plan) -> bool:
    """True when no subset changes its captions between steps (text outputs can be cached)."""
    return not any(
        subset.params.get(key)
        for dataset in plan.datasets
        for subset in dataset.subsets
        for key in _CAPTION_RANDOMNESS
    )
