"""The CPU kernel choices training makes for a loaded model (generate and the data tools keep
torch's own): the U-Net's small-map convolutions through im2col + GEMM (conv_path.py) and the
U-Net's and text encoders' frozen Linear layers through linear_path.py. Tests that rebuild a
trained model to compare outputs give the fresh one the same kernels with this."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdtrain.models.conv_path import use_gemm_convolutions
from sdtrain.models.linear_path import use_weight_first_linears

if TYPE_CHECKING:
    from sdtrain.models.bundle import ModelBundle


def use_training_kernels(bundle: ModelBundle) -> None:
    """Route `bundle`'s U-Net convolutions and its U-Net's and text encoders' Linear layers."""
    use_gemm_convolutions(bundle.unet)
    for model in (bundle.unet, *bundle.family.text_encoders(bundle)):
        use_weight_first_linears(model)
