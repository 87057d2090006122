"""Optimizer table: resolution, fallbacks, kwargs, extras, Adafactor and schedule-free rules."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from sdtrain.config.sections import OptimizerSection
from sdtrain.engine.kwargs import parse_kwargs
from sdtrain.engine.optim import OPTIMIZERS, build_optimizer, valid_names
from sdtrain.engine.schedule import build_lr_scheduler
from sdtrain.errors import ConfigError, MissingExtraError
from sdtrain.methods.base import ParamGroup


def groups(*lrs: float) -> list[ParamGroup]:
    torch.manual_seed(0)
    return [
        ParamGroup(name=f"g{i}", params=[torch.nn.Parameter(torch.randn(4, 3))], lr=lr)
        for i, lr in enumerate(lrs)
    ]


def build(optimizer_type: str = "AdamW", lrs=(1e-3,), **kw):
    return build_optimizer(groups(*lrs), OptimizerSection(optimizer_type=optimizer_type, **kw))


def test_default_is_fused_adamw_with_group_lrs():
    built = build("", lrs=(1e-4, 5e-5))
    opt = built.optimizer
    assert type(opt) is torch.optim.AdamW
    assert built.description == "torch.optim.adamw.AdamW"
    assert opt.defaults["fused"] is True
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]
    assert built.group_names == ["g0", "g1"]
    assert not built.is_schedule_free and not built.lr_is_adaptive


def test_fused_is_left_to_the_user_when_given():
    built = build("adamw", optimizer_args=["fused=False"])
    assert built.optimizer.defaults["fused"] is False
    assert built.description == "torch.optim.adamw.AdamW(fused=False)"


def test_names_are_case_insensitive_and_sgdnesterov_defaults_momentum():
    for name in ("SGDNesterov", "sgdnesterov", "SGDNESTEROV"):
        built = build(name)
        assert type(built.optimizer) is torch.optim.SGD
        assert built.optimizer.defaults["momentum"] == 0.9
        assert built.optimizer.defaults["nesterov"] is True
        assert built.description == "torch.optim.sgd.SGD(momentum=0.9)"
    built = build("SGDNesterov", optimizer_args={"momentum": 0.5})
    assert built.optimizer.defaults["momentum"] == 0.5


def test_torch_fallback_and_dotted_path():
    assert type(build("SGD").optimizer) is torch.optim.SGD
    built = build("torch.optim.RMSprop", optimizer_args=["alpha=0.9"])
    assert type(built.optimizer) is torch.optim.RMSprop
    assert built.description == "torch.optim.rmsprop.RMSprop(alpha=0.9)"


def test_unknown_names_list_the_valid_ones():
    for bad in ("sgd", "NoSuchOptimizer", "no_such_module.Opt", "torch.optim.Nope"):
        with pytest.raises(ConfigError) as err:
            build(bad)
        problem = err.value.problems[0]
        assert problem.key == "optimizer.optimizer_type"
        assert "AdamW8bit" in problem.hint and "Prodigy" in problem.hint


def test_key_value_args_are_literal_evaluated():
    built = build(
        "AdamW",
        optimizer_args=["betas=0.9,0.999", "weight_decay=0.01", "eps=1e-8", "amsgrad=True"],
    )
    d = built.optimizer.defaults
    assert d["betas"] == (0.9, 0.999) and d["weight_decay"] == 0.01
    assert d["eps"] == 1e-8 and d["amsgrad"] is True
    assert built.args == "betas=(0.9, 0.999),weight_decay=0.01,eps=1e-08,amsgrad=True"


def test_parse_kwargs_table_raw_strings_and_errors():
    assert parse_kwargs({"weight_decay": 0.05}, "k") == {"weight_decay": 0.05}
    assert parse_kwargs(["mode=fast", "x = 3", "expr=a=b"], "k") == {
        "mode": "fast",
        "x": 3,
        "expr": "a=b",
    }
    assert parse_kwargs(None, "k") == {}
    with pytest.raises(ConfigError) as err:
        parse_kwargs(["novalue", "=3"], "optimizer.optimizer_args")
    assert [p.key for p in err.value.problems] == [
        "optimizer.optimizer_args[0]",
        "optimizer.optimizer_args[1]",
    ]


def test_bad_argument_names_are_config_errors():
    with pytest.raises(ConfigError) as err:
        build("AdamW", optimizer_args={"bogus": 1})
    assert "bogus" in err.value.problems[0].message


EXTRAS = [
    ("AdamW8bit", "bnb", "bitsandbytes", "bitsandbytes"),
    ("PagedLion8bit", "bnb", "bitsandbytes", "bitsandbytes"),
    ("Lion", "lion", "lion-pytorch", "lion_pytorch"),
    ("DAdaptation", "dadapt", "dadaptation", "dadaptation"),
    ("DAdaptAdanIP", "dadapt", "dadaptation", "dadaptation"),
    ("Prodigy", "prodigy", "prodigyopt", "prodigyopt"),
    ("AdamWScheduleFree", "schedulefree", "schedulefree", "schedulefree"),
]


@pytest.mark.parametrize(("name", "extra", "package", "module"), EXTRAS)
def test_missing_extras_name_the_extra(name, extra, package, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    with pytest.raises(MissingExtraError) as err:
        build(name)
    assert err.value.extra == extra and err.value.package == package
    assert package in err.value.message and name in err.value.message
    assert f"sdtrain[{extra}]" in err.value.hint


@pytest.mark.parametrize(
    ("name", "module"),
    [("Lion", "lion_pytorch"), ("DAdaptAdanIP", "dadaptation"), ("Prodigy", "prodigyopt"),
     ("RAdamScheduleFree", "schedulefree"), ("AdamW8bit", "bitsandbytes")],
)  # fmt: skip
def test_optional_optimizers_build_and_step_when_installed(name, module):
    pytest.importorskip(module)
    built = build(name, lrs=(1.0,))
    built.optimizer.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    built.optimizer.step()
    assert built.lr_is_adaptive == name.startswith(("DAdapt", "Prodigy"))
    assert built.is_schedule_free == name.endswith("ScheduleFree")


def test_table_covers_the_reference_names():
    expected = {
        "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion",
        "Lion8bit", "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "DAdaptation",
        "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP",
        "DAdaptLion", "DAdaptSGD", "Prodigy", "Adafactor", "RAdamScheduleFree",
        "AdamWScheduleFree", "SGDScheduleFree",
    }  # fmt: skip
    assert set(valid_names()) == expected
    assert all(key == spec.name.lower() for key, spec in OPTIMIZERS.items())


def test_adafactor_relative_step_owns_the_lr_and_forces_its_scheduler():
    built = build("Adafactor", lrs=(1e-3, 2e-3), learning_rate=1e-3)
    opt = built.optimizer
    assert type(opt).__name__ == "Adafactor"
    assert built.lr_is_adaptive
    assert built.description == "transformers.optimization.Adafactor(relative_step=True)"
    assert all(g["lr"] is None for g in opt.param_groups)
    section = OptimizerSection(optimizer_type="Adafactor", learning_rate=1e-3)
    scheduler = build_lr_scheduler(opt, section, total_steps=10)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert scheduler.get_last_lr() == [1e-3, 1e-3]


def test_adafactor_without_relative_step_uses_the_given_lr():
    built = build("Adafactor", lrs=(1e-3,), optimizer_args=["relative_step=False"])
    assert not built.lr_is_adaptive
    assert built.optimizer.param_groups[0]["lr"] == 1e-3
    # warmup_init needs relative_step, which the reference switches back on
    built = build("Adafactor", optimizer_args=["relative_step=False", "warmup_init=True"])
    assert built.lr_is_adaptive and "relative_step=True" in built.args


def test_schedule_free_optimizers_are_put_in_train_mode(monkeypatch):
    fake = types.ModuleType("schedulefree")

    class AdamWScheduleFree(torch.optim.SGD):
        def __init__(self, params, lr=1e-3, warmup_steps=0):
            super().__init__(params, lr=lr)
            self.mode = "eval"

        def train(self):
            self.mode = "train"

        def eval(self):
            self.mode = "eval"

    AdamWScheduleFree.__module__ = "schedulefree"
    fake.AdamWScheduleFree = AdamWScheduleFree
    monkeypatch.setitem(sys.modules, "schedulefree", fake)
    section = OptimizerSection(
        optimizer_type="AdamWScheduleFree", lr_scheduler="cosine", lr_warmup_steps=5
    )
    built = build_optimizer(groups(1e-3), section)
    assert built.is_schedule_free and built.optimizer.mode == "train"
    scheduler = build_lr_scheduler(built.optimizer, section, total_steps=20)
    for _ in range(10):
        built.optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [1e-3]  # constant: the optimizer schedules internally
