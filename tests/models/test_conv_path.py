"""im2col + GEMM convolutions for the U-Net's small fp32 CPU feature maps."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdtrain.models import conv_path
from sdtrain.models.conv_path import use_gemm_convolutions


class _Ops(TorchDispatchMode):
    """Names of the aten ops run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _gemm_used(module: torch.nn.Module, x: torch.Tensor) -> bool:
    with _Ops() as ops:
        module(x).sum().backward()
    return "_slow_conv2d_forward" in ops.names and "_slow_conv2d_backward" in ops.names


@pytest.mark.parametrize(
    ("cin", "cout", "hw", "kernel", "stride"),
    [(32, 16, 8, 3, 1), (16, 16, 16, 3, 1), (24, 8, 8, 1, 1), (16, 16, 32, 3, 2)],
)
def test_small_maps_take_the_gemm_path_with_the_same_results(cin, cout, hw, kernel, stride):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
    gemm = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
    gemm.load_state_dict(plain.state_dict())
    assert use_gemm_convolutions(gemm) == 1
    x = torch.randn(2, cin, hw, hw)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), gemm(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemm.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-3)
    assert _gemm_used(gemm, x.clone().requires_grad_())
    assert not _gemm_used(plain, x.clone().requires_grad_())
    assert gemm.state_dict().keys() == plain.state_dict().keys()


def test_everything_else_keeps_torchs_choice(monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    use_gemm_convolutions(conv)
    big = torch.randn(2, 8, 17, 16, requires_grad=True)  # 272 output positions > 256
    assert not _gemm_used(conv, big)
    small = torch.randn(2, 8, 8, 8, requires_grad=True)  # batch 2: torch itself picks oneDNN
    with torch.autocast("cpu", dtype=torch.float16), _Ops() as ops:
        conv(small)
    assert "_slow_conv2d_forward" not in ops.names
    fp16 = torch.nn.Conv2d(8, 8, 3, padding=1).to(torch.float16)
    use_gemm_convolutions(fp16)
    with _Ops() as ops:
        fp16(small.detach().to(torch.float16))
    assert "_slow_conv2d_forward" not in ops.names
    # grouped, dilated, 'same'-padded and reflect-padded convolutions are never routed
    others = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=2),
        torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        torch.nn.Conv2d(8, 8, 3, padding="same"),
        torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
    )
    assert use_gemm_convolutions(others) == 0
    monkeypatch.setenv(conv_path.OPT_OUT, "onednn")
    fresh = torch.nn.Conv2d(8, 8, 3, padding=1)
    assert use_gemm_convolutions(fresh) == 0
    assert not _gemm_used(fresh, small)


def test_the_loader_leaves_torchs_kernels_and_routing_is_stable():
    """The loader (used by `generate`) leaves torch's kernels alone; once routed (training does
    it: tests/methods/test_contract.py), the U-Net computes the same outputs call after call."""
    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle

    bundle = load_bundle(ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1"))
    assert not any("_conv_forward" in vars(m) for m in bundle.unet.modules())
    convs = [m for m in bundle.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert use_gemm_convolutions(bundle.unet) == len(convs) > 0
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)  # batch 2: torch itself would pick oneDNN
    context = torch.randn(2, 77, bundle.unet.config.cross_attention_dim)
    with torch.no_grad():
        with _Ops() as ops:
            first = bundle.unet(latents, 10, context).sample
        second = bundle.unet(latents, 10, context).sample
    assert "_slow_conv2d_forward" in ops.names
    assert torch.equal(first, second)


def test_a_one_by_one_map_with_a_trained_weight_keeps_torchs_choice():
    """A 1x1 map is contiguous and channels-last at once; the GEMM path's weight gradient
    would then be refused by torch ('grad_weight must be contiguous')."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    use_gemm_convolutions(conv)
    x = torch.randn(2, 8, 1, 1, requires_grad=True)
    conv(x).sum().backward()
    assert conv.weight.grad is not None


def test_bf16_autocast_and_bf16_weights_take_it_like_autocasts_conv2d():
    """Under CPU bf16 autocast the routed convolution computes in bf16 from fp32 or bf16
    weights, as autocast's conv2d does; a bf16 module with bf16 inputs too."""
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(16, 16, 3, padding=1)
    routed = torch.nn.Conv2d(16, 16, 3, padding=1)
    routed.load_state_dict(plain.state_dict())
    use_gemm_convolutions(routed)
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x)
        with _Ops() as ops:
            got = routed(x)
    assert "_slow_conv2d_forward" in ops.names
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    frozen = torch.nn.Conv2d(16, 16, 3, padding=1).to(torch.bfloat16).requires_grad_(False)
    use_gemm_convolutions(frozen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _gemm_used(frozen, x.clone().requires_grad_())
    assert _gemm_used(frozen, x.to(torch.bfloat16).requires_grad_())


def _frozen_pair(cin: int, cout: int, kernel: int, stride: int, bias: bool) -> tuple:
    """The same frozen convolution twice, the second one routed."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Conv2d(  # noqa: E731
        cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias
    ).requires_grad_(False)
    plain, routed = make(), make()
    routed.load_state_dict(plain.state_dict())
    use_gemm_convolutions(routed)
    return plain, routed


@pytest.mark.parametrize(
    ("cin", "cout", "hw", "kernel", "stride", "batch", "bias"),
    [
        (32, 16, 8, 3, 1, 1, True),
        (16, 24, 4, 3, 1, 2, False),
        (24, 8, 8, 1, 1, 2, True),
        (16, 16, 8, 3, 2, 1, True),  # stride 2 to 4x4
        (8, 8, 16, 3, 2, 3, False),  # stride 2 to 8x8, batch 3
    ],
)
def test_frozen_small_maps_take_the_one_gemm_input_gradient(
    monkeypatch, cin, cout, hw, kernel, stride, batch, bias
):
    """At 8x8 or fewer output positions a frozen fp32 convolution keeps torch's GEMM forward
    (the same bits) and computes its input gradient as one GEMM over every sample's positions
    with the weight on the right, then col2im: correct to float rounding."""
    monkeypatch.setenv(conv_path.GRAD_OPT, "rows")
    plain, routed = _frozen_pair(cin, cout, kernel, stride, bias)
    x = torch.randn(batch, cin, hw, hw)
    xa, xb, xd = (
        x.clone().double().requires_grad_() if i == 2 else x.clone().requires_grad_()
        for i in range(3)
    )
    pad = (kernel // 2, kernel // 2)
    ya = torch._C._nn.thnn_conv2d(
        xa, plain.weight, plain.kernel_size, plain.bias, (stride,) * 2, pad
    )
    with _Ops() as ops:
        yb = routed(xb)
        yb.backward(grad := torch.randn_like(yb))
    assert torch.equal(yb, ya)
    assert "_slow_conv2d_forward" in ops.names and "_slow_conv2d_backward" not in ops.names
    assert {"mm", "col2im"} <= ops.names
    ya.backward(grad)
    exact = torch.nn.functional.conv2d(
        xd, plain.weight.double(), None if plain.bias is None else plain.bias.double(), stride, pad
    )
    exact.backward(grad.double())
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xb.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    assert yb.grad_fn is not None and type(yb.grad_fn).__name__ != "SlowConv2DBackward0"


def test_the_one_gemm_input_gradient_is_only_for_frozen_fp32_small_maps(monkeypatch):
    monkeypatch.setenv(conv_path.GRAD_OPT, "rows")
    plain, routed = _frozen_pair(16, 16, 3, 1, True)

    def stock_backward(module: torch.nn.Module, x: torch.Tensor) -> bool:
        with _Ops() as ops:
            module(x.requires_grad_()).sum().backward()
        return "_slow_conv2d_backward" in ops.names

    assert not stock_backward(routed, torch.randn(1, 16, 8, 8))
    assert stock_backward(routed, torch.randn(1, 16, 9, 8))  # 72 positions > 64
    routed.weight.requires_grad_(True)  # a trained weight: torch's backward computes its gradient
    assert stock_backward(routed, torch.randn(1, 16, 8, 8))
    routed.weight.requires_grad_(False)
    routed.bias.requires_grad_(True)
    assert stock_backward(routed, torch.randn(1, 16, 8, 8))
    routed.bias.requires_grad_(False)
    half = torch.nn.Conv2d(16, 16, 3, padding=1).to(torch.bfloat16).requires_grad_(False)
    use_gemm_convolutions(half)
    assert stock_backward(half, torch.randn(1, 16, 8, 8, dtype=torch.bfloat16))
    monkeypatch.setenv(conv_path.GRAD_OPT, "stock")
    use_gemm_convolutions(routed)  # the variable is read when a model is routed
    assert stock_backward(routed, torch.randn(1, 16, 8, 8))


def test_the_one_gemm_input_gradient_defaults_to_the_cpus_it_was_measured_faster_on(monkeypatch):
    monkeypatch.delenv(conv_path.GRAD_OPT, raising=False)
    assert conv_path.rows_gradient_here("AVX512")
    for capability in ("AVX2", "DEFAULT", "SVE256"):
        assert not conv_path.rows_gradient_here(capability)
    monkeypatch.setenv(conv_path.GRAD_OPT, "rows")
    assert conv_path.rows_gradient_here("AVX2")
    monkeypatch.setenv(conv_path.GRAD_OPT, "stock")
    assert not conv_path.rows_gradient_here("AVX512")
