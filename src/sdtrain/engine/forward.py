"""The trained forward (text conditioning + UNet prediction) as one module for accelerate.

accelerate's `prepare` wraps this module (DDP with several processes, autocast with mixed
precision); the UNet and the family's text encoders are its children, so DDP sees every
trainable parameter of them and its gradient exchange covers them. One process gets the
module back unwrapped (only the autocast wrapper with mixed precision), so the numbers are those
of calling the UNet directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sdtrain.data.batch import Batch
    from sdtrain.methods.base import Method, StepInfo
    from sdtrain.models.bundle import ModelBundle


class Opaque:
    """Carries a value through DDP's forward untouched (DDP moves tensors inside dataclasses
    and containers to the device; the batch's pixels are not needed there)."""

    def __init__(self, value: Any) -> None:
        self.value = value


class TrainForward(torch.nn.Module):
    """forward(noisy, timesteps, Opaque((batch, step))) -> the UNet's prediction for the batch:
    the method's conditioning, then the family's UNet call."""

    def __init__(self, method: Method, bundle: ModelBundle) -> None:
        super().__init__()
        self.unet = bundle.unet
        self.text_encoders = torch.nn.ModuleList(bundle.family.text_encoders(bundle))
        # plain attributes, not submodules
        self.__dict__["method"] = method
        self.__dict__["bundle"] = bundle

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, carry: Opaque) -> torch.Tensor:
        batch: Batch
        step: StepInfo
        batch, step = carry.value
        cond = self.method.condition(self.bundle, batch, step)
        return self.bundle.family.predict(self.unet, noisy, timesteps, cond)
