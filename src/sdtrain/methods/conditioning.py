"""Caption -> text conditioning, shared by every method (clip skip, long prompts, weights)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sdtrain.data.plan import Plan
    from sdtrain.methods.base import Conditioning
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
        return self.condition(bundle, captions, grad).hidden_states

    def condition(self, bundle: ModelBundle, captions: Sequence[str], grad: bool) -> Conditioning:
        """The family's Conditioning of captions (hidden states plus its extras)."""
        return bundle.family.encode_text(
            bundle,
            captions,
            clip_skip=self.clip_skip,
            max_token_length=self.max_token_length,
            weighted=self.weighted,
            grad=grad,
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
