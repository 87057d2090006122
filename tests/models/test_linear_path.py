"""The weight-first GEMM for frozen fp32 CPU Linear layers with few rows."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdtrain.models import linear_path
from sdtrain.models.linear_path import use_weight_first_linears


class _Calls(TorchDispatchMode):
    """(op name, shape of its first matrix) for every mm / addmm run inside the block; `pairs`
    has the shapes of both matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.pairs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm"):
            first, second = args[0:2] if name == "mm" else args[1:3]
            self.calls.append((name, tuple(first.shape)))
            self.pairs.append((tuple(first.shape), tuple(second.shape)))
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


def test_the_default_routes_only_the_cpus_it_was_measured_faster_on(monkeypatch):
    monkeypatch.delenv(linear_path.OPT_OUT, raising=False)
    assert linear_path.routes_here("AVX2")
    for capability in ("AVX512", "DEFAULT", "SVE256", "NO AVX"):
        assert not linear_path.routes_here(capability)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert use_weight_first_linears(torch.nn.Linear(4, 4)) == 0
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert use_weight_first_linears(torch.nn.Linear(4, 4)) == 1
    monkeypatch.setenv(linear_path.OPT_OUT, "path")  # forced on, whatever the CPU
    assert linear_path.routes_here("AVX512") and linear_path.routes_here("DEFAULT")
    monkeypatch.setenv(linear_path.OPT_OUT, "stock")  # forced off
    assert not linear_path.routes_here("AVX2")


def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def _adapted(model, reference, targets: list[str], inplace_reference: bool) -> tuple:
    """The same LoRA (seeded) on both, sdtrain's in-place sum on `model` (and on `reference`
    when `inplace_reference`)."""
    from peft import LoraConfig, inject_adapter_in_model

    from sdtrain.methods.adapters.inplace import use_inplace_sum

    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(2)
    model = inject_adapter_in_model(config, model)
    torch.manual_seed(2)
    reference = inject_adapter_in_model(config, reference)
    assert use_inplace_sum([model.get_submodule(t) for t in targets]) == len(targets)
    if inplace_reference:
        use_inplace_sum([reference.get_submodule(t) for t in targets])
    return model, reference


def _same_outputs_and_grads(model, reference, x: torch.Tensor, out: torch.Tensor, atol: float):
    expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), (_, b) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=atol, msg=name)


def test_applies_once_to_plain_linears_and_survives_an_adapter():
    """Also under sdtrain's in-place LoRA sum, which adds into the base output in place: the
    output must not be a view made inside the autograd function."""
    model = _mlp()
    model.requires_grad_(False)
    assert use_weight_first_linears(model) == 2
    assert use_weight_first_linears(model) == 0  # already routed
    torch.manual_seed(1)
    reference = _mlp()
    reference.load_state_dict(model.state_dict())
    reference.requires_grad_(False)
    model, reference = _adapted(model, reference, ["0", "2"], inplace_reference=False)
    x = torch.randn(2, 16, 24)
    with _Calls() as ops:
        out = model(x)
    assert _weight_first(ops.calls, model[0].base_layer.weight)
    _same_outputs_and_grads(model, reference, x, out, atol=1e-6)


WIDE = linear_path.WIDE


@pytest.mark.parametrize("rows", [16, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_a_wide_layer_with_few_rows_runs_weight_first_in_blocks_of_weight_rows(rows, bias):
    out = WIDE + 2 * linear_path.WEIGHT_ROWS_PER_GEMM + 4  # a short last block too
    plain, routed = _pair(24, out, bias)
    x = torch.randn(1, rows, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _Calls() as forward:
        yb = routed(xb)
    blocks = [first for first, _ in forward.pairs]
    step = linear_path.WEIGHT_ROWS_PER_GEMM
    assert blocks == [(min(step, out - start), 24) for start in range(0, out, step)]
    ya = plain(xa)
    assert yb.is_contiguous()
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    with _Calls() as backward:
        yb.backward(grad)
    assert [first for first, _ in backward.pairs] == [(24, out)]  # one GEMM, weight first
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(routed(x), yb.detach())


@pytest.mark.parametrize("shape", [(65, 24), (1, 77, 24), (2, 512, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_wide_layer_with_more_rows_runs_in_blocks_of_output_columns(shape, bias):
    out = WIDE + 100
    plain, routed = _pair(24, out, bias)
    x = torch.randn(*shape)
    rows = x.numel() // 24
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _Calls() as forward:
        yb = routed(xb)
    step = linear_path.COLUMNS_PER_GEMM
    expected = [((rows, 24), (24, min(step, out - start))) for start in range(0, out, step)]
    assert forward.pairs == expected
    ya = plain(xa)
    assert yb.shape == ya.shape and yb.is_contiguous() and yb._base is None
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    with _Calls() as backward:
        yb.backward(grad)
    assert backward.pairs == [((rows, out), (out, 24))]  # g @ W, as torch's linear
    assert xb.grad.shape == xa.grad.shape
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(routed(x), yb.detach())


def test_narrow_layers_and_many_rows_keep_torchs_linear():
    _, narrow = _pair(24, WIDE - 1, True)
    with _Calls() as ops:
        narrow(torch.randn(77, 24))
    assert ops.pairs == [((77, 24), (24, WIDE - 1))]  # one GEMM: F.linear
    _, wide = _pair(24, WIDE, True)
    with _Calls() as ops:
        wide(torch.randn(linear_path.MAX_BLOCKED_ROWS + 1, 24))
    assert len(ops.pairs) == 1
    wide.weight.requires_grad_(True)  # a trained weight: torch's linear computes its gradient
    with _Calls() as ops:
        wide(torch.randn(77, 24))
    assert len(ops.pairs) == 1


def test_a_wide_layer_under_an_adapter_gives_the_same_gradients():
    """Column blocks under sdtrain's in-place LoRA sum (the base output is a fresh tensor the
    adapter adds into in place) give what the same adapter gives over torch's linear."""

    def wide() -> torch.nn.Sequential:
        return torch.nn.Sequential(torch.nn.Linear(24, WIDE), torch.nn.GELU())

    torch.manual_seed(0)
    model = wide().requires_grad_(False)
    reference = wide().requires_grad_(False)
    reference.load_state_dict(model.state_dict())
    assert use_weight_first_linears(model) == 1
    model, reference = _adapted(model, reference, ["0"], inplace_reference=True)
    x = torch.randn(1, 77, 24)
    with _Calls() as ops:
        out = model(x)
    assert ((77, 24), (24, linear_path.COLUMNS_PER_GEMM)) in ops.pairs
    _same_outputs_and_grads(model, reference, x, out, atol=1e-5)
