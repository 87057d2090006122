"""`sdtrain train lora`: a kohya-compatible LoRA (peft adapters) on a frozen SD1/SD2 model."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.errors import ConfigError, Problem
from sdtrain.methods.adapters.lora import LoraNetwork
from sdtrain.methods.adapters.spec import LoraSpec
from sdtrain.methods.base import Conditioning, ParamGroup, SavePoint, StepInfo
from sdtrain.methods.conditioning import TextConditioning

if TYPE_CHECKING:
    import torch

    from sdtrain.config.methods import NetworkSection
    from sdtrain.config.run import RunConfig
    from sdtrain.config.sections import OptimizerSection
    from sdtrain.data.batch import Batch
    from sdtrain.data.plan import Plan
    from sdtrain.models.bundle import ModelBundle
    from sdtrain.models.text_cache import TextConditionCache

log = logging.getLogger(__name__)


def build(config: RunConfig, plan: Plan) -> LoraMethod:
    """The registry's builder: LoraMethod from a validated `sdtrain train lora` config."""
    from sdtrain.methods.conditioning import static_captions

    return LoraMethod(
        config.network,  # type: ignore[attr-defined]
        config.optimizer,
        prior_loss_weight=config.training.prior_loss_weight,
        clip_skip=config.model.clip_skip,
        max_token_length=config.model.max_token_length,
        save_precision=config.saving.save_precision,
        weighted_captions=config.training.weighted_captions,
        cache_text_outputs=static_captions(plan),
    )


class LoraMethod:
    """LoRA-LierLa / C3Lier training with the reference's file format, groups and options.

    The base U-Net and text encoder are frozen; peft injects the adapters; trainable parameters
    are fp32. Saves `<stem>.safetensors` (or .pt/.ckpt) in the kohya layout, plus
    `<stem>.diffusers.safetensors` when save_diffusers_lora is set.
    """

    name = "lora"
    export_needs_vae = False  # a LoRA file holds only the adapters (the VAE can be released)
    frozen_half_ok = True  # the frozen base may stay in the file's half precision (fp32 runs)
    half_token_embedding_ok = True  # the token embedding never trains (models/half_embedding.py)
    # the adapters are created in fp32 whatever the base's dtype (adapters/lora.py inject)
    compute_dtype_parts = ("unet", "text_encoder", "vae")

    def __init__(
        self,
        network: NetworkSection,
        optimizer: OptimizerSection,
        *,
        prior_loss_weight: float = 1.0,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        save_precision: str | None = None,
        weighted_captions: bool = False,
        cache_text_outputs: bool = False,
    ) -> None:
        """Validate [network] now (config errors before any model loads); read ranks for
        dim_from_weights."""
        from sdtrain.methods.adapters.kinds import adapter_kind

        self.section = network
        self.kind = adapter_kind(network.network_module)
        kohya = self.kind.keys()  # this kind's file key map
        self.spec = LoraSpec.from_section(network)
        self._weights: dict[str, torch.Tensor] | None = None
        if network.network_weights:
            self._weights, _ = kohya.read(network.network_weights)
        if network.dim_from_weights and self._weights is not None:
            self.spec = self.spec.with_module_ranks(kohya.file_ranks(self._weights))
            if network.network_dim is not None:
                log.info(
                    "dim_from_weights: ranks and alphas come from %s; network_dim %s and "
                    "network_alpha %s are not used",
                    network.network_weights,
                    network.network_dim,
                    network.network_alpha,
                )
        base_lr = optimizer.learning_rate
        self.text_encoder_lr = (
            optimizer.text_encoder_lr if optimizer.text_encoder_lr is not None else base_lr
        )
        self.unet_lr = optimizer.unet_lr if optimizer.unet_lr is not None else base_lr
        self.prior_loss_weight = prior_loss_weight
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length
        self.text = TextConditioning(clip_skip, max_token_length, weighted_captions)
        self.cache_text_outputs = cache_text_outputs  # captions are static: encode each once
        self._text_cache: TextConditionCache | None = None
        self.save_precision = save_precision
        self.network: LoraNetwork | None = None
        self._trains_te = False

    def prepare(self, bundle: ModelBundle) -> list[ParamGroup]:
        """Freeze the base, inject the adapters (fp32), load network_weights, build the groups."""
        kohya = self.kind.keys()
        roots = bundle.family.adapter_roots(bundle)
        for model in roots.values():
            model.requires_grad_(False)
        network = self.kind.network_class().create(roots["unet"], roots["text_encoder"], self.spec)
        if not network.modules:
            raise ConfigError(
                [
                    Problem(
                        key="network",
                        message="no layer gets a LoRA module",
                        hint="check network_dim / block_dims / network_weights",
                    )
                ]
            )
        for module in network.modules:
            module.down.float()
            module.up.float()
        if self._weights is not None:
            report = kohya.load_into(network, self._weights, str(self.section.network_weights))
            report.log(f"network_weights {Path(str(self.section.network_weights)).name}")
            self._weights = None
            mismatch = report.mismatch(len(network.modules))
            if mismatch and not self.section.network_weights_partial:
                raise ConfigError(
                    [
                        Problem(
                            key="network.network_weights",
                            message=f"{self.section.network_weights} does not fit this network: "
                            f"{mismatch}",
                            hint="a LoRA for another architecture (SDXL?), or other network "
                            "settings (network_dim/network_args/conv_dim, *_only); set "
                            "network_weights_partial = true to load only the matching part",
                        )
                    ]
                )
        network.train(True)
        groups = network.param_groups(self.text_encoder_lr, self.unet_lr)
        self._trains_te = any(
            p.requires_grad
            for m in network.of("text_encoder")
            for p in (m.down.weight, m.up.weight)
        )
        self.network = network
        if self.cache_text_outputs and not self._trains_te:
            from sdtrain.models.text_cache import TextConditionCache

            self._text_cache = TextConditionCache(
                lambda captions: self.text.encode(bundle, captions, grad=False)
            )
        return groups

    def _net(self) -> LoraNetwork:
        if self.network is None:
            raise RuntimeError("LoraMethod.prepare() has not run")
        return self.network

    def train_text_encoder(self) -> bool:
        """True when a text-encoder LoRA group is trained (LR > 0, not unet-only)."""
        return self._trains_te

    def condition(self, bundle: ModelBundle, batch: Batch, step: StepInfo) -> Conditioning:
        """(B, 75n+2, D) text conditioning; no autograd graph when the text encoder is frozen.

        Also sets the LoRA multiplier to the batch's dataset `network_multiplier` (a batch comes
        from one dataset, so one multiplier applies to all its samples) for this micro-step.
        """
        self._net().set_multiplier(batch.network_multiplier)
        if self._text_cache is not None:
            return Conditioning(self._text_cache(batch.captions))
        return Conditioning(self.text.encode(bundle, batch.captions, grad=self._trains_te))

    def loss_weights(self, batch: Batch) -> torch.Tensor | None:
        """(B,) prior_loss_weight on regularization samples, 1 elsewhere (None when all 1)."""
        import torch

        if self.prior_loss_weight == 1.0:
            return None
        is_reg = batch.is_reg.bool()
        return torch.where(is_reg, self.prior_loss_weight, 1.0).to(torch.float32)

    @property
    def after_step_any_outcome(self) -> bool:
        """after_step may run before the host knows whether the update was applied
        (engine/host_sync.py): only without max-norm, which changes the weights."""
        return self.section.scale_weight_norms is None

    def after_step(self, bundle: ModelBundle, step: StepInfo) -> dict[str, float]:
        """scale_weight_norms max-norm; returns max_norm/keys_scaled, average/max key norm."""
        if self.section.scale_weight_norms is None:
            return {}
        return self._net().apply_max_norm(self.section.scale_weight_norms)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The kohya state dict in full precision (stable names, independent of peft)."""
        return self.kind.keys().state_dict(self._net())

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore trainable_state() in place (strict: any mismatch is a TrainingError)."""
        self.kind.keys().load_into(self._net(), state, "resumable state", strict=True)

    def export(self, bundle: ModelBundle, point: SavePoint) -> list[Path]:
        """Write `<stem>.<save_model_as>` (kohya) and optionally `<stem>.diffusers.safetensors`."""
        from sdtrain.methods.adapters.diffusers_format import save_diffusers_lora
        from sdtrain.methods.adapters.metadata import lora_metadata

        kohya = self.kind.keys()
        network = self._net()
        roots = bundle.family.adapter_roots(bundle)
        path = Path(point.output_dir) / f"{point.stem}.{self.section.save_model_as}"
        tensors = kohya.state_dict(network, self.save_precision)
        metadata = None
        if path.suffix == ".safetensors":
            metadata = lora_metadata(point.metadata, self.section, self.spec, bundle.family)
        kohya.save(path, tensors, metadata)
        paths = [path]
        if self.section.save_diffusers_lora:
            extra = Path(point.output_dir) / f"{point.stem}.diffusers.safetensors"
            save_diffusers_lora(
                extra, network, roots["unet"], roots["text_encoder"], self.save_precision
            )
            paths.append(extra)
        log.info("saved %s", ", ".join(p.name for p in paths))
        return paths

    @contextlib.contextmanager
    def sampling(self, bundle: ModelBundle) -> Iterator[None]:
        """The live adapters sample as trained; their dropouts are off inside the context."""
        network = self._net()
        was_training = network.is_training()
        multiplier = network.multiplier
        network.train(False)
        network.set_multiplier(1.0)  # samples show the LoRA as saved (weight 1)
        try:
            yield
        finally:
            network.train(was_training)
            network.set_multiplier(multiplier)
