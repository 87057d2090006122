"""Fused backward pass: per-weight optimizer updates during backward, gradients freed at once."""

from __future__ import annotations

import copy

import pytest
import torch

from sdtrain.config.sections import OptimizerSection, TrainingSection
from sdtrain.engine.fused_backward import FusedBackward, check_fused_backward
from sdtrain.engine.optim import build_optimizer
from sdtrain.errors import ConfigError
from sdtrain.methods.base import ParamGroup


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
    )


def _optimizer(
    model: torch.nn.Module, name: str = "Adafactor", lr: float = 0.0, **kw
) -> torch.optim.Optimizer:
    section = OptimizerSection(optimizer_type=name, learning_rate=lr, **kw)
    groups = [ParamGroup("unet", list(model.parameters()), lr)]
    return build_optimizer(groups, section).optimizer


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(5, 8, generator=g)
    return (model(x) ** 2).mean()


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_matches_plain_adafactor_with_per_weight_clipping(max_norm):
    plain, fused = _model(), _model()
    opt_plain, opt_fused = _optimizer(plain), _optimizer(fused)
    hooks = FusedBackward(opt_fused, max_norm)
    for step in range(4):
        _loss(plain, step).backward()
        if max_norm:
            for p in plain.parameters():  # the fused rule: each weight clipped on its own
                torch.nn.utils.clip_grad_norm_([p], max_norm)
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        _loss(fused, step).backward()
        assert all(p.grad is None for p in fused.parameters())  # freed during backward
        assert hooks.take_finite()
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    start = _model().parameters()
    assert any(not torch.equal(a, b) for a, b in zip(start, fused.parameters(), strict=True))


def test_gradients_do_not_pile_up():
    """When a hook runs, the gradients of weights handled before it are already gone."""
    model = _model()
    optimizer = _optimizer(model)
    fused = FusedBackward(optimizer, 1.0)
    alive: list[int] = []
    params = list(model.parameters())

    def watch(_):
        alive.append(sum(p.grad is not None for p in params))

    for p in params:
        p.register_post_accumulate_grad_hook(watch)
    _loss(model, 0).backward()
    assert max(alive) <= 1
    assert fused.take_finite()


def test_nonfinite_gradient_skips_that_weight_and_flags_the_step():
    model = _model()
    optimizer = _optimizer(model)
    fused = FusedBackward(optimizer, 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.ones(2, 8)).sum() * float("nan")).backward()
    assert not fused.take_finite()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert fused.take_finite()  # reset for the next step


def test_state_dict_round_trip_resumes_exactly():
    a, b = _model(), _model()
    opt_a = _optimizer(a)
    FusedBackward(opt_a, 1.0)
    for step in range(2):
        _loss(a, step).backward()
    b.load_state_dict(a.state_dict())
    opt_b = _optimizer(b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read from disk
    FusedBackward(opt_b, 1.0)
    for step in range(2, 4):
        _loss(a, step).backward()
        _loss(b, step).backward()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# (optimizer_type, optimizer_args, module that must be importable)
PER_WEIGHT = [
    ("AdamW", [], "torch"),
    ("AdamW", ["fused=False", "weight_decay=0.1", "amsgrad=True"], "torch"),
    ("Adam", [], "torch"),
    ("SGDNesterov", [], "torch"),
    ("RMSprop", ["momentum=0.5"], "torch"),
    ("Adagrad", [], "torch"),
    ("Adamax", [], "torch"),
    ("NAdam", [], "torch"),
    ("RAdam", ["decoupled_weight_decay=True", "weight_decay=0.01"], "torch"),
    ("AdamW8bit", [], "bitsandbytes"),
    ("Lion8bit", [], "bitsandbytes"),
    ("Lion", [], "lion_pytorch"),
    ("Adafactor", ["scale_parameter=False", "relative_step=False", "warmup_init=False"], "torch"),
    ("Adafactor", ["weight_decay=0.01", "clip_threshold=0.5"], "torch"),  # relative step
]


@pytest.mark.parametrize(("name", "args", "module"), PER_WEIGHT)
def test_per_weight_optimizers_fused_update_exactly_as_their_step(name, args, module):
    """Without clipping, a fused run is bit-identical to the optimizer's own step() after
    backward, and its state too; so the same optimizer keeps its meaning with the fused pass."""
    pytest.importorskip(module)
    plain, fused = _model(), _model()
    kw = {"lr": 1e-2, "optimizer_args": args}
    opt_plain, opt_fused = _optimizer(plain, name, **kw), _optimizer(fused, name, **kw)
    hooks = FusedBackward(opt_fused, 0.0)
    for step in range(4):
        _loss(plain, step).backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        _loss(fused, step).backward()
        assert all(p.grad is None for p in fused.parameters())
        assert hooks.take_finite()
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b)
        sa, sb = opt_plain.state[a], opt_fused.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key
    start = _model().parameters()
    assert any(not torch.equal(a, b) for a, b in zip(start, fused.parameters(), strict=True))


def test_settings_it_cannot_work_with():
    ok = OptimizerSection(optimizer_type="Adafactor", fused_backward_pass=True)
    check_fused_backward(ok, TrainingSection())
    for name in ("AdamW", "adamw8bit", "Lion", "SGDNesterov", "SGD", "RAdam"):
        check_fused_backward(
            OptimizerSection(optimizer_type=name, fused_backward_pass=True), TrainingSection()
        )
    check_fused_backward(OptimizerSection(), TrainingSection(gradient_accumulation_steps=4))
    with pytest.raises(ConfigError) as info:
        check_fused_backward(
            OptimizerSection(optimizer_type="Prodigy", fused_backward_pass=True),
            TrainingSection(gradient_accumulation_steps=2),
        )
    messages = [p.message for p in info.value.problems]
    assert len(messages) == 2
    assert "Prodigy estimates one step size" in messages[0] and "accumulated" in messages[1]
    assert all(p.key == "optimizer.fused_backward_pass" for p in info.value.problems)
    refused = {
        "AdamWScheduleFree": "per parameter group",
        "DAdaptAdam": "every weight",
        "LBFGS": "cannot tell",
        "mypkg.optim.Fancy": "cannot tell",
    }
    for name, why in refused.items():
        section = OptimizerSection(optimizer_type=name, fused_backward_pass=True)
        with pytest.raises(ConfigError) as info:
            check_fused_backward(section, TrainingSection())
        assert why in info.value.problems[0].message, name
        assert "AdamW8bit" in info.value.problems[0].hint
