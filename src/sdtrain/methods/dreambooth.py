"""`sdtrain train dreambooth`: the reference's train_db (full U-Net, text encoder by default).

DreamBooth datasets only (blueprint, legacy `<repeats>_<tokens>` folders or the run TOML); the
regularization stream is weighted by prior_loss_weight and balanced as `dataset plan` shows
(§4.7). The text encoder is trained unless `train_text_encoder = false` (or the reference's
`stop_text_encoder_training = -1`) and is frozen from optimizer step N on with
`stop_text_encoder_training = N` (§9.1). Class images for prior preservation can be generated
before training (sdtrain.methods.class_images).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdtrain.methods.full_model import FullModelMethod, common_options

if TYPE_CHECKING:
    from sdtrain.config.methods import DreamBoothSection


class DreamBoothMethod(FullModelMethod):
    """Full DreamBooth training with the reference's groups, TE stop and prior loss weight."""

    name = "dreambooth"

    def __init__(
        self,
        section: DreamBoothSection,
        *,
        learning_rate: float,
        prior_loss_weight: float = 1.0,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        weighted_captions: bool = False,
        save_precision: str | None = None,
        title: str | None = None,
    ) -> None:
        stop = section.stop_text_encoder_training
        super().__init__(
            section,
            learning_rate=learning_rate,
            train_text_encoder=section.train_text_encoder,
            stop_text_encoder_at=stop if stop is not None and stop >= 0 else None,
            prior_loss_weight=prior_loss_weight,
            clip_skip=clip_skip,
            max_token_length=max_token_length,
            weighted_captions=weighted_captions,
            save_precision=save_precision,
            title=title,
        )


def build(config: Any, plan: Any = None) -> DreamBoothMethod:
    """The method for a validated `train dreambooth` run config (registry builder)."""
    return DreamBoothMethod(
        config.dreambooth,
        prior_loss_weight=config.training.prior_loss_weight,
        **common_options(config),
    )
