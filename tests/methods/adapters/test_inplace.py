"""The in-place LoRA sum: the outputs and gradients of peft's forward (bit for bit where no GEMM
sums into the base output)."""

from __future__ import annotations

import pytest
from lora_helpers import inputs, trained_network

from sdtrain.methods.adapters.inplace import InplaceConv2d, InplaceLinear


def _as_peft(net) -> None:
    """Put the injected layers back on peft's own classes (the reference forward)."""
    for m in net.modules:
        m.layer.__class__ = type(m.layer).__mro__[1]


def _step(unet, text_encoder, net):
    """Outputs and every LoRA gradient of one training forward/backward."""
    x, t, _context, ids = inputs(3)
    for p in net.parameters():
        p.grad = None
    context = text_encoder(ids).last_hidden_state
    out = unet(x, t, context).sample
    (out.square().mean() + context.square().mean()).backward()
    return [out.detach(), context.detach()] + [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("network", [{}, {"network_args": ["conv_dim=4", "conv_alpha=2"]}])
def test_inplace_sum_matches_peft(network, monkeypatch):
    import torch

    from sdtrain.methods.adapters import inplace

    taken = []
    real = inplace._gemm_into
    monkeypatch.setattr(inplace, "_gemm_into", lambda *a: taken.append(real(*a)) or taken[-1])
    unet, text_encoder, net = trained_network(network_dim=4, network_alpha=2.0, **network)
    kinds = {type(m.layer) for m in net.modules}
    assert kinds <= {InplaceLinear, InplaceConv2d} and InplaceLinear in kinds
    if network:
        assert InplaceConv2d in kinds
    net.train(True)
    ours = _step(unet, text_encoder, net)
    _as_peft(net)
    assert not {type(m.layer) for m in net.modules} & {InplaceLinear, InplaceConv2d}
    theirs = _step(unet, text_encoder, net)
    assert len(ours) == len(theirs) > 2
    for a, b in zip(ours, theirs, strict=True):
        # the Linear up-projections scale inside the GEMM: a rounding apart, no more
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(taken)  # the Linear up-projections went through the in-place GEMM
    assert _step(unet, text_encoder, net)[0].equal(theirs[0])  # peft again: deterministic


def test_without_gemm_the_sum_is_peft_bit_for_bit(monkeypatch):
    """Up-projections that cannot take the GEMM (here: all) give peft's bits exactly."""
    import torch

    from sdtrain.methods.adapters import inplace

    monkeypatch.setattr(inplace, "_gemm_up", lambda *a: False)
    unet, text_encoder, net = trained_network(network_dim=4, network_alpha=2.0)
    net.train(True)
    ours = _step(unet, text_encoder, net)
    _as_peft(net)
    theirs = _step(unet, text_encoder, net)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_disabled_adapters_take_peft_forward():
    """A disabled adapter (module dropout's switch) gives the base output, as in peft."""
    import torch

    unet, text_encoder, net = trained_network(network_dim=4, network_alpha=2.0)
    layer = next(m.layer for m in net.modules if type(m.layer) is InplaceLinear)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        live = layer(x)
        layer._disable_adapters = True
        base = layer(x)
        layer._disable_adapters = False
        assert torch.equal(base, layer.base_layer(x))
        assert not torch.equal(live, base)


def test_gemm_check_on_devices_autocast_does_not_know():
    """The meta device (FLOP counting, model skeletons) has no autocast state: no error."""
    import torch

    from sdtrain.methods.adapters import inplace

    up = torch.nn.Linear(4, 6, bias=False, device="meta")
    result = torch.empty(6, 6, device="meta")
    assert inplace._gemm_into(result, torch.empty(6, 4, device="meta"), up)
