"""`sdtrain train finetune`: the reference's fine_tune (full U-Net, optional text encoder).

Fine-tune (metadata) datasets only: `in_json` + `train_data_dir`, or blueprint subsets with
`metadata_file` (caption + tags, dataset_repeats). `train_text_encoder` adds the text encoder,
`learning_rate_te` gives it its own LR group (§9.2). Works with and without cache_latents (the
reference crashes without it). Like the reference, no prior-loss weights apply (fine-tune data
has no regularization images).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdtrain.methods.full_model import FullModelMethod, common_options

if TYPE_CHECKING:
    from sdtrain.config.methods import FinetuneSection


class FinetuneMethod(FullModelMethod):
    """Full fine-tuning on captioned metadata datasets."""

    name = "finetune"

    def __init__(
        self,
        section: FinetuneSection,
        *,
        learning_rate: float,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        weighted_captions: bool = False,
        save_precision: str | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(
            section,
            learning_rate=learning_rate,
            train_text_encoder=section.train_text_encoder,
            clip_skip=clip_skip,
            max_token_length=max_token_length,
            weighted_captions=weighted_captions,
            save_precision=save_precision,
            title=title,
        )


def build(config: Any, plan: Any = None) -> FinetuneMethod:
    """The method for a validated `train finetune` run config (registry builder)."""
    return FinetuneMethod(config.finetune, **common_options(config))
