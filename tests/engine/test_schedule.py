"""LR schedules: values at chosen steps, warm-up ratios, custom classes, errors, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from sdtrain.config.sections import OptimizerSection
from sdtrain.engine.schedule import build_lr_scheduler, warmup_steps
from sdtrain.errors import ConfigError


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def lrs(steps: int, total: int = 100, num_processes: int = 1, **section) -> list[float]:
    """LR in effect at steps 0..steps-1 (value before each optimizer step)."""
    opt = optimizer()
    scheduler = build_lr_scheduler(opt, OptimizerSection(**section), total, num_processes)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    return out


def test_constant_is_the_default():
    assert lrs(5) == [1.0] * 5


def test_linear_with_warmup_ratio():
    values = lrs(101, lr_scheduler="linear", lr_warmup_steps=0.1)  # 10 warm-up steps
    assert values[0] == 0.0
    assert values[5] == pytest.approx(0.5)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5)
    assert values[100] == pytest.approx(0.0)


def test_warmup_ratio_counts_all_processes():
    assert warmup_steps(OptimizerSection(lr_warmup_steps=0.1), 100) == 10
    assert warmup_steps(OptimizerSection(lr_warmup_steps=0.1), 100, num_processes=2) == 20
    assert warmup_steps(OptimizerSection(lr_warmup_steps=7), 100, num_processes=2) == 7
    values = lrs(201, total=100, num_processes=2, lr_scheduler="linear", lr_warmup_steps=0.1)
    assert values[20] == pytest.approx(1.0) and values[110] == pytest.approx(0.5)


def test_constant_with_warmup():
    values = lrs(8, lr_scheduler="constant_with_warmup", lr_warmup_steps=4)
    assert values == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])


def test_cosine_and_cosine_with_restarts():
    cos = lrs(101, lr_scheduler="cosine")
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.5) and cos[100] == pytest.approx(0.0)
    restarts = lrs(100, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    for step in (0, 10, 25, 49, 50, 75, 99):
        expected = 0.5 * (1 + math.cos(math.pi * ((2 * step / 100) % 1.0)))
        assert restarts[step] == pytest.approx(expected)
    assert restarts[50] == pytest.approx(1.0)  # the restart


def test_polynomial_power_and_extra_args():
    values = lrs(
        101, lr_scheduler="polynomial", lr_scheduler_power=2.0, lr_scheduler_args=["lr_end=0.1"]
    )
    assert values[0] == 1.0
    assert values[50] == pytest.approx((1.0 - 0.1) * 0.5**2 + 0.1)
    assert values[100] == pytest.approx(0.1)


def test_piecewise_constant_step_rules():
    values = lrs(
        30, lr_scheduler="piecewise_constant", lr_scheduler_args={"step_rules": "1:10,0.1:20,0.01"}
    )
    assert values[5] == 1.0 and values[15] == pytest.approx(0.1) and values[25] == 0.01


def test_custom_scheduler_classes():
    values = lrs(6, lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2", "gamma=0.5"])
    assert values == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    values = lrs(
        3,
        lr_scheduler_type="torch.optim.lr_scheduler.ExponentialLR",
        lr_scheduler_args={"gamma": 0.9},
    )
    assert values == pytest.approx([1, 0.9, 0.81])


@pytest.mark.parametrize(
    ("section", "key", "text"),
    [
        ({"lr_scheduler": "constant", "lr_warmup_steps": 10}, "lr_warmup_steps",
         "constant_with_warmup"),
        ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2"],
          "lr_warmup_steps": 3}, "lr_warmup_steps", "lr_warmup_steps = 0"),
        ({"lr_scheduler": "nope"}, "lr_scheduler", "cosine_with_restarts"),
        ({"lr_scheduler": "adafactor"}, "lr_scheduler", "Adafactor"),
        ({"lr_scheduler_type": "NoSuchLR"}, "lr_scheduler_type", "StepLR"),
        ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["bogus=1"]}, "lr_scheduler_args",
         "lr_scheduler_args"),
        ({"lr_scheduler": "piecewise_constant"}, "lr_scheduler_args", "step_rules"),
    ],
)  # fmt: skip
def test_errors_name_the_key_and_a_way_out(section, key, text):
    with pytest.raises(ConfigError) as err:
        build_lr_scheduler(optimizer(), OptimizerSection(**section), 100)
    problem = err.value.problems[0]
    assert problem.key == f"optimizer.{key}"
    assert text in problem.hint


@pytest.mark.parametrize(
    "section",
    [
        {"lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 0.1,
         "lr_scheduler_num_cycles": 3},
        {"lr_scheduler": "linear", "lr_warmup_steps": 5},
        {"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=3", "gamma=0.7"]},
    ],
)  # fmt: skip
def test_state_dict_round_trip_continues_exactly(section):
    def pair():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-2)
        return opt, build_lr_scheduler(opt, OptimizerSection(**section), 40)

    def run(opt, scheduler, steps):
        out = []
        for _ in range(steps):
            opt.param_groups[0]["params"][0].grad = torch.ones(3)
            opt.step()
            scheduler.step()
            out.append(scheduler.get_last_lr()[0])
        return out

    straight = run(*pair(), 25)
    opt, scheduler = pair()
    first = run(opt, scheduler, 11)
    opt_state, sched_state = opt.state_dict(), scheduler.state_dict()
    opt2, scheduler2 = pair()
    opt2.load_state_dict(opt_state)
    scheduler2.load_state_dict(sched_state)
    assert first + run(opt2, scheduler2, 14) == straight
