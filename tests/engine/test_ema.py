"""EMA weights: the update rule, warm-up, exact state round trip and the no-copy swap."""

from __future__ import annotations

import torch

from sdtrain.engine.ema import EmaWeights


def _params() -> dict[str, torch.nn.Parameter]:
    torch.manual_seed(0)
    return {"a": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.nn.Parameter(torch.randn(5))}


def test_update_rule_with_and_without_warmup():
    params = _params()
    start = {k: p.detach().clone() for k, p in params.items()}
    ema = EmaWeights(params, 0.9, offload=True, warmup=False)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    ema.update()
    for name, p in params.items():
        assert torch.allclose(ema.shadow[name], 0.9 * start[name] + 0.1 * p.detach())
        assert ema.shadow[name].device.type == "cpu" and ema.shadow[name].dtype == torch.float32
    warm = EmaWeights(_params(), 0.999)
    assert warm.current_decay() == 0.1  # (1 + 0) / (10 + 0): early weights are not frozen in
    warm.update()
    assert abs(warm.current_decay() - 2 / 11) < 1e-12


def test_state_round_trip():
    params = _params()
    ema = EmaWeights(params, 0.5)
    ema.update()
    other = EmaWeights(_params(), 0.5)
    other.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    assert other.updates == 1
    assert all(torch.equal(ema.shadow[k], other.shadow[k]) for k in ema.shadow)


def test_swapped_in_exchanges_without_copies_and_restores():
    params = _params()
    ema = EmaWeights(params, 0.5)
    with torch.no_grad():
        for p in params.values():
            p.mul_(3.0)
    live = {k: p.detach().clone() for k, p in params.items()}
    pointer = params["a"].data_ptr()
    with ema.swapped_in():
        assert params["a"].data_ptr() == ema.shadow["a"].data_ptr()  # no copy
        assert torch.equal(params["b"].detach(), ema.shadow["b"])
    assert params["a"].data_ptr() == pointer
    assert all(torch.equal(params[k].detach(), live[k]) for k in params)
