"""What DreamBooth and fine-tuning share: full U-Net (+ text encoder) training and full saves.

The live U-Net / text encoder are the trained weights (no wrapper), so sampling during training
and every save see them directly. Parameter groups follow the reference (§9.1/§9.2): one group
at learning_rate, or two (unet, text_encoder) when learning_rate_te is given. The text encoder
can be frozen from an optimizer step on (DreamBooth's stop_text_encoder_training). Optional EMA
weights (sdtrain.engine.ema) are part of the resumable state and are saved beside the model or
as the model. Saves use the reference's formats and defaults (§9.3, sdtrain.models.save).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.methods.base import Conditioning, ParamGroup, SavePoint, StepInfo
from sdtrain.methods.conditioning import TextConditioning

if TYPE_CHECKING:
    import torch

    from sdtrain.config.methods import FullModelSection
    from sdtrain.data.batch import Batch
    from sdtrain.engine.ema import EmaWeights
    from sdtrain.models.bundle import ModelBundle

log = logging.getLogger(__name__)

SUFFIX = {"ckpt": ".ckpt", "safetensors": ".safetensors"}


def common_options(config: Any) -> dict[str, Any]:
    """Constructor options every full-model method takes from the run config's common tables."""
    return {
        "learning_rate": config.optimizer.learning_rate,
        "clip_skip": config.model.clip_skip,
        "max_token_length": config.model.max_token_length,
        "weighted_captions": config.training.weighted_captions,
        "save_precision": config.saving.save_precision,
        "title": config.saving.metadata_title,
    }


def save_format(section: FullModelSection, source_kind: str) -> str:
    """save_model_as, or the reference's default for the source kind (§9.3)."""
    if section.save_model_as:
        return section.save_model_as
    if source_kind == "single_file":
        return "safetensors" if section.use_safetensors else "ckpt"
    return "diffusers_safetensors" if section.use_safetensors else "diffusers"


class FullModelMethod:
    """Full U-Net (+ optional text encoder) training; subclasses set name and policies."""

    name = "full"

    def __init__(
        self,
        section: FullModelSection,
        *,
        learning_rate: float,
        train_text_encoder: bool,
        stop_text_encoder_at: int | None = None,
        prior_loss_weight: float = 1.0,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        weighted_captions: bool = False,
        save_precision: str | None = None,
        title: str | None = None,
    ) -> None:
        self.section = section
        self.learning_rate = learning_rate
        self.lr_te = section.learning_rate_te
        self.trains_te = train_text_encoder
        self.stop_te_at = stop_text_encoder_at
        self.prior_loss_weight = prior_loss_weight
        self.text = TextConditioning(clip_skip, max_token_length, weighted_captions)
        self.clip_skip = clip_skip
        self.save_precision = save_precision
        self.title = title
        self.te_active = train_text_encoder
        self.ema: EmaWeights | None = None
        self._named: dict[str, torch.nn.Parameter] = {}
        self._bundle: ModelBundle | None = None

    # ------------------------------------------------------------------ setup
    def prepare(self, bundle: ModelBundle) -> list[ParamGroup]:
        """Unfreeze the U-Net (and the text encoder when trained); return the LR groups."""
        self._bundle = bundle
        bundle.unet.requires_grad_(True).train()
        encoders = _text_encoders(bundle)
        for encoder in encoders.values():
            encoder.requires_grad_(self.trains_te)
            encoder.train(self.trains_te)
        unet = [p for p in bundle.unet.parameters() if p.requires_grad]
        named = {f"unet.{n}": p for n, p in bundle.unet.named_parameters()}
        groups = []
        if self.trains_te:
            text = []
            for root, encoder in encoders.items():
                named.update({f"{root}.{n}": p for n, p in encoder.named_parameters()})
                text.extend(encoder.parameters())
            if self.lr_te is None:
                groups.append(ParamGroup("unet", unet + text, self.learning_rate))
            else:
                groups.append(ParamGroup("unet", unet, self.learning_rate))
                groups.append(ParamGroup("text_encoder", text, self.lr_te))
        else:
            groups.append(ParamGroup("unet", unet, self.learning_rate))
        self._named = named
        if self.section.ema_decay is not None:
            from sdtrain.engine.ema import EmaWeights

            self.ema = EmaWeights(named, self.section.ema_decay, offload=self.section.ema_on_cpu)
        log.info(
            "%s: training %d tensors (%.1f M weights)%s",
            self.name,
            len(named),
            sum(p.numel() for p in named.values()) / 1e6,
            "" if self.trains_te else "; text encoder frozen",
        )
        return groups

    def train_text_encoder(self) -> bool:
        """True while the text encoder is trained."""
        return self.te_active

    def _freeze_text_encoder(self, bundle: ModelBundle) -> None:
        for encoder in _text_encoders(bundle).values():
            encoder.requires_grad_(False)
            encoder.eval()
            for p in encoder.parameters():
                p.grad = None
        self.te_active = False

    def _sync_text_encoder(self, bundle: ModelBundle, global_step: int) -> None:
        """Freeze the text encoder once `global_step` optimizer steps are done (§9.1)."""
        if self.te_active and self.stop_te_at is not None and global_step >= self.stop_te_at:
            log.info("step %d: text encoder frozen (stop_text_encoder_training)", global_step)
            self._freeze_text_encoder(bundle)

    # ------------------------------------------------------------------ steps
    def condition(self, bundle: ModelBundle, batch: Batch, step: StepInfo) -> Conditioning:
        """Text conditioning; with a graph into the text encoder while it is trained."""
        self._sync_text_encoder(bundle, step.global_step)
        hidden = self.text.encode(bundle, batch.captions, grad=self.te_active)
        return Conditioning(hidden_states=hidden)

    def loss_weights(self, batch: Batch) -> torch.Tensor | None:
        """(B,) prior_loss_weight on regularization samples (None when it is 1)."""
        import torch

        if self.prior_loss_weight == 1.0:
            return None
        return torch.where(batch.is_reg.bool(), self.prior_loss_weight, 1.0).to(torch.float32)

    def after_step(self, bundle: ModelBundle, step: StepInfo) -> dict[str, float]:
        """EMA update; freezes the text encoder when its last step is done."""
        if self.ema is not None:
            self.ema.update()
        self._sync_text_encoder(bundle, step.global_step)
        return {}

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by `unet.*` / `text_encoder.*` name, plus the EMA shadow."""
        state = {name: p.detach() for name, p in self._named.items()}
        if self.ema is not None:
            state.update(self.ema.state_dict())
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore trainable_state() in place (strict)."""
        import torch

        from sdtrain.errors import TrainingError

        missing = [name for name in self._named if name not in state]
        if missing:
            raise TrainingError(
                f"the resumable state lacks {len(missing)} weights (e.g. {missing[0]})",
                hint="resume with the method and text-encoder settings the state was made with",
            )
        with torch.no_grad():
            for name, param in self._named.items():
                param.copy_(state[name])
        if self.ema is not None:
            self.ema.load_state_dict(state)

    # ------------------------------------------------------------------ output
    def _ema_context(self, deliverable_only: bool) -> contextlib.AbstractContextManager[None]:
        wanted = self.ema is not None and (
            not deliverable_only or self.section.ema_save == "deliverable"
        )
        return self.ema.swapped_in() if wanted and self.ema else contextlib.nullcontext()

    def _write(self, bundle: ModelBundle, point: SavePoint, stem: str) -> Path:
        from sdtrain.models.park import resident

        with resident(bundle.vae):  # parked during training once latents are cached
            return self._write_resident(bundle, point, stem)

    def _write_resident(self, bundle: ModelBundle, point: SavePoint, stem: str) -> Path:
        from sdtrain.models.save import save_diffusers, save_single_file

        fmt = save_format(self.section, bundle.source.kind)
        if fmt in SUFFIX:
            return save_single_file(
                bundle,
                Path(point.output_dir) / f"{stem}{SUFFIX[fmt]}",
                precision=self.save_precision,
                title=self.title or stem,
                clip_skip=self.clip_skip,
                epoch=point.epoch,
                global_step=point.global_step,
                overwrite=True,
                keep_source_keys=True,
            )
        return save_diffusers(
            bundle,
            Path(point.output_dir) / stem,
            safe_serialization=fmt == "diffusers_safetensors",
            precision=self.save_precision,
            overwrite=True,
        )

    def export(self, bundle: ModelBundle, point: SavePoint) -> list[Path]:
        """The full model in save_model_as (and `<stem>-ema` beside it when asked)."""
        with self._ema_context(deliverable_only=True):
            paths = [self._write(bundle, point, point.stem)]
        if self.ema is not None and self.section.ema_save == "beside":
            with self.ema.swapped_in():
                paths.append(self._write(bundle, point, f"{point.stem}-ema"))
        log.info("saved %s", ", ".join(p.name for p in paths))
        return paths

    @contextlib.contextmanager
    def sampling(self, bundle: ModelBundle) -> Iterator[None]:
        """Samples show the deliverable's weights (the EMA when it is the deliverable)."""
        with self._ema_context(deliverable_only=True):
            yield


def _text_encoders(bundle: ModelBundle) -> dict[str, torch.nn.Module]:
    """The family's text encoders by bundle attribute name ("text_encoder" for SD1/SD2: the
    parameter-name prefix of states and saves)."""
    family = bundle.family
    return dict(zip(family.text_encoder_names, family.text_encoders(bundle), strict=True))
