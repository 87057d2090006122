"""The weight-first GEMM for frozen fp32 CPU Linear layers with few rows."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdtrain.models import linear_path
from sdtrain.models.linear_path import use_weight_first_linears


class _Calls(TorchDispatchMode):
    """(op name, shape of its first matrix) for every mm / addmm run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm"):
            first = args[0] if name == "mm" else args[1]
            self.calls.append((name, tuple(first.shape)))
        return func(*args, **(kwargs or {}))


def _pair(features_in: int, features_out: int, bias: bool) -> tuple[torch.nn.Linear, ...]:
    torch.manual_seed(0)
    plain = torch.nn.Linear(features_in, features_out, bias=bias).requires_grad_(False)
    routed = torch.nn.Linear(features_in, features_out, bias=bias).requires_grad_(False)
    routed.load_state_dict(plain.state_dict())
    assert use_weight_first_linears(routed) == 1
    return plain, routed


def _weight_first(calls: list, weight: torch.Tensor) -> bool:
    return any(shape == tuple(weight.shape) for _, shape in calls)


@pytest.mark.parametrize("shape", [(16, 24), (1, 64, 24), (2, 4, 4, 24), (1, 40, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_take_the_weight_first_gemm_with_the_same_results(shape, bias):
    plain, routed = _pair(24, 48, bias)
    x = torch.randn(*shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _Calls() as forward:
        yb = routed(xb)
    ya = plain(xa)
    assert _weight_first(forward.calls, routed.weight)
    assert yb.shape == ya.shape and yb.is_contiguous()
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    with _Calls() as backward:
        yb.backward(grad)
    # the input gradient is W^T @ g^T: its first matrix is the weight transposed
    assert backward.calls and all(s == (24, 48) for _, s in backward.calls)
    assert xb.grad.shape == xa.grad.shape and xb.grad.is_contiguous()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-6)
    again = routed(x.clone().requires_grad_())
    assert torch.equal(again, yb)  # the same inputs give the same bits


def test_everything_else_is_torchs_linear(monkeypatch):
    _, routed = _pair(24, 48, True)

    def stock(x: torch.Tensor) -> bool:
        with _Calls() as ops:
            routed(x)
        return not _weight_first(ops.calls, routed.weight)

    assert stock(torch.randn(15, 24))  # too few rows
    assert stock(torch.randn(65, 24))  # too many
    assert stock(torch.randn(24))  # one vector
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stock(torch.randn(32, 24))
    routed.weight.requires_grad_(True)  # a trained weight: torch computes its gradient
    assert stock(torch.randn(32, 24))
    with torch.no_grad():  # ... unless no gradient is recorded
        assert not stock(torch.randn(32, 24))
    routed.weight.requires_grad_(False)
    routed.bias.requires_grad_(True)
    assert stock(torch.randn(32, 24))
    routed.bias.requires_grad_(False)
    assert not stock(torch.randn(32, 24))
    half = torch.nn.Linear(24, 48).requires_grad_(False).to(torch.bfloat16)
    use_weight_first_linears(half)
    with _Calls() as ops:
        half(torch.randn(32, 24, dtype=torch.bfloat16))
    assert not _weight_first(ops.calls, half.weight)
    monkeypatch.setenv(linear_path.OPT_OUT, "stock")
    assert use_weight_first_linears(torch.nn.Linear(4, 4)) == 0


def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def test_applies_once_to_plain_linears_and_survives_an_adapter():
    """Also under sdtrain's in-place LoRA sum, which adds into the base output in place: the
    output must not be a view made inside the autograd function."""
    from peft import LoraConfig, inject_adapter_in_model

    from sdtrain.methods.adapters.inplace import use_inplace_sum

    model = _mlp()
    model.requires_grad_(False)
    assert use_weight_first_linears(model) == 2
    assert use_weight_first_linears(model) == 0  # already routed
    torch.manual_seed(1)
    reference = _mlp()
    reference.load_state_dict(model.state_dict())
    reference.requires_grad_(False)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    torch.manual_seed(2)
    model = inject_adapter_in_model(config, model)
    torch.manual_seed(2)
    reference = inject_adapter_in_model(config, reference)
    assert use_inplace_sum([model[0], model[2]]) == 2
    x = torch.randn(2, 16, 24)
    with _Calls() as ops:
        out = model(x)
    assert _weight_first(ops.calls, model[0].base_layer.weight)
    expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), (_, b) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
