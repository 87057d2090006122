"""The optimizer table (§1.4): names -> classes, optional extras, reference argument handling."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sdtrain.engine.kwargs import format_kwargs, parse_kwargs
from sdtrain.errors import ConfigError, MissingExtraError, Problem

if TYPE_CHECKING:
    from sdtrain.config.sections import OptimizerSection
    from sdtrain.methods.base import ParamGroup

logger = logging.getLogger(__name__)

_BNB = ("bnb", "bitsandbytes")
_DADAPT = ("dadapt", "dadaptation")
_SF = ("schedulefree", "schedulefree")


@dataclass(frozen=True)
class OptimizerSpec:
    """Where a named optimizer lives and how the reference builds it."""

    name: str  # canonical spelling, for messages
    module: str
    attr: str
    extra: tuple[str, str] | None = None  # (sdtrain extra, pip package) when optional
    defaults: dict[str, Any] = field(default_factory=dict)  # set when absent; logged
    fixed: dict[str, Any] = field(default_factory=dict)  # always passed; not logged
    kind: str = "plain"  # plain | adaptive (D-Adaptation, Prodigy) | adafactor | schedulefree


def _spec(name: str, module: str, attr: str | None = None, **kw: Any) -> tuple[str, OptimizerSpec]:
    return name.lower(), OptimizerSpec(name, module, attr or name, **kw)


OPTIMIZERS: dict[str, OptimizerSpec] = dict(
    [
        _spec("AdamW", "torch.optim"),
        _spec("AdamW8bit", "bitsandbytes.optim", extra=_BNB),
        _spec("PagedAdamW", "bitsandbytes.optim", extra=_BNB),
        _spec("PagedAdamW8bit", "bitsandbytes.optim", extra=_BNB),
        _spec("PagedAdamW32bit", "bitsandbytes.optim", extra=_BNB),
        _spec("Lion", "lion_pytorch", extra=("lion", "lion-pytorch")),
        _spec("Lion8bit", "bitsandbytes.optim", extra=_BNB),
        _spec("PagedLion8bit", "bitsandbytes.optim", extra=_BNB),
        _spec(
            "SGDNesterov",
            "torch.optim",
            "SGD",
            defaults={"momentum": 0.9},
            fixed={"nesterov": True},
        ),
        _spec(
            "SGDNesterov8bit",
            "bitsandbytes.optim",
            "SGD8bit",
            extra=_BNB,
            defaults={"momentum": 0.9},
            fixed={"nesterov": True},
        ),
        _spec(
            "DAdaptation",
            "dadaptation.experimental",
            "DAdaptAdamPreprint",
            extra=_DADAPT,
            kind="adaptive",
        ),
        _spec("DAdaptAdamPreprint", "dadaptation.experimental", extra=_DADAPT, kind="adaptive"),
        _spec("DAdaptAdaGrad", "dadaptation", extra=_DADAPT, kind="adaptive"),
        _spec("DAdaptAdam", "dadaptation", extra=_DADAPT, kind="adaptive"),
        _spec("DAdaptAdan", "dadaptation", extra=_DADAPT, kind="adaptive"),
        _spec("DAdaptAdanIP", "dadaptation.experimental", extra=_DADAPT, kind="adaptive"),
        _spec("DAdaptLion", "dadaptation", extra=_DADAPT, kind="adaptive"),
        _spec("DAdaptSGD", "dadaptation", extra=_DADAPT, kind="adaptive"),
        _spec("Prodigy", "prodigyopt", extra=("prodigy", "prodigyopt"), kind="adaptive"),
        _spec("Adafactor", "transformers.optimization", kind="adafactor"),
        _spec("RAdamScheduleFree", "schedulefree", extra=_SF, kind="schedulefree"),
        _spec("AdamWScheduleFree", "schedulefree", extra=_SF, kind="schedulefree"),
        _spec("SGDScheduleFree", "schedulefree", extra=_SF, kind="schedulefree"),
    ]
)


@dataclass
class BuiltOptimizer:
    """The optimizer plus what the engine needs to know about it.

    `description` is the reference's `ss_optimizer` value: `module.Class(k=v,...)` with the
    user's (and the reference's forced) kwargs. `lr_is_adaptive`: the optimizer chooses its own
    step size (D-Adaptation/Prodigy keep `d` in each param group; Adafactor with relative_step).
    Schedule-free optimizers are returned in train mode; call `.eval()` around sampling/saving.
    """

    optimizer: torch.optim.Optimizer
    name: str  # module.Class
    args: str  # k=v,k=v
    group_names: list[str]
    is_schedule_free: bool = False
    lr_is_adaptive: bool = False

    @property
    def description(self) -> str:
        return self.name + (f"({self.args})" if self.args else "")


def valid_names() -> list[str]:
    """Canonical names of the table, for messages and `--help`."""
    return [spec.name for spec in OPTIMIZERS.values()]


def _unknown(name: str, why: str) -> ConfigError:
    return ConfigError(
        [
            Problem(
                key="optimizer.optimizer_type",
                message=f"unknown optimizer {name!r}: {why}",
                value=name,
                has_value=True,
                hint=f"use one of {', '.join(valid_names())}, a torch.optim class name "
                "(e.g. SGD) or a dotted path module.Class",
            )
        ]
    )


def resolve_optimizer_class(name: str) -> tuple[type, OptimizerSpec | None]:
    """The class for an optimizer name: the table (case-insensitive), else `torch.optim.<Name>`
    without a dot, else `module.path.Class` (both case-sensitive, as in the reference)."""
    spec = OPTIMIZERS.get((name or "AdamW").lower())
    if spec is not None:
        try:
            module = importlib.import_module(spec.module)
        except ImportError as err:
            if spec.extra is None:
                raise
            extra, package = spec.extra
            raise MissingExtraError(f"optimizer {spec.name}", extra, package) from err
        cls = getattr(module, spec.attr, None)
        if cls is None:
            package = spec.extra[1] if spec.extra else spec.module
            raise ConfigError(
                [
                    Problem(
                        key="optimizer.optimizer_type",
                        message=f"{spec.module} has no {spec.attr} (installed version too old)",
                        value=name,
                        has_value=True,
                        hint=f"upgrade it: pip install -U {package}",
                    )
                ]
            )
        return cls, spec
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim
    except ImportError as err:
        raise _unknown(name, f"module {module_name!r} cannot be imported ({err})") from err
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        where = module_name or "torch.optim"
        raise _unknown(name, f"not in the optimizer table and not a class in {where}")
    return cls, None


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW handles floating tensors on CPU and CUDA."""
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def _adafactor_groups(
    kwargs: dict[str, Any], torch_groups: list[dict[str, Any]], section: OptimizerSection
) -> bool:
    """Reference Adafactor rules; returns True when it runs with relative_step (own LR)."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init needs relative_step; setting relative_step=True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if section.lr_scheduler != "constant_with_warmup":
            logger.warning("Adafactor without relative_step: constant_with_warmup is recommended")
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            logger.warning("Adafactor: clip_threshold=1.0 is recommended")
        return False
    if section.learning_rate != 0.0:
        logger.warning(
            "Adafactor relative_step: learning_rate %g is only the initial LR the scheduler "
            "reports; Adafactor computes its own step size",
            section.learning_rate,
        )
    if len({group["lr"] for group in torch_groups}) > 1 or any(
        group["lr"] != section.learning_rate for group in torch_groups
    ):
        logger.warning("Adafactor relative_step: per-group learning rates are ignored")
    for group in torch_groups:
        group.pop("lr", None)
    return True


def build_optimizer(groups: list[ParamGroup], section: OptimizerSection) -> BuiltOptimizer:
    """Build the optimizer for parameter groups (each with its own LR) as §1.4 describes.

    AdamW uses torch's fused kernel when every parameter is a floating tensor on CPU/CUDA and
    `optimizer_args` sets neither `fused` nor `foreach` (not shown in the description).
    Raises ConfigError for unknown names or bad arguments, MissingExtraError for missing extras.
    """
    name = section.optimizer_type or "AdamW"
    cls, spec = resolve_optimizer_class(name)
    kwargs = parse_kwargs(section.optimizer_args, "optimizer.optimizer_args")
    torch_groups = [{"params": g.params, "lr": g.lr, **g.extra} for g in groups]
    kind = spec.kind if spec else "plain"
    lr: float | None = section.learning_rate

    if spec is not None:
        for key, value in spec.defaults.items():
            if key not in kwargs:
                logger.info("%s: %s defaults to %s", spec.name, key, value)
                kwargs[key] = value
    call_kwargs = dict(kwargs)
    if spec is not None:
        call_kwargs.update(spec.fixed)

    lr_is_adaptive = kind == "adaptive"
    if kind == "adaptive":
        first = torch_groups[0]["lr"] if torch_groups else lr
        if first <= 0.1:
            logger.warning(
                "%s adapts the step size: learning_rate around 1.0 is recommended (got %g)",
                spec.name if spec else name,
                first,
            )
        if len({g["lr"] for g in torch_groups}) > 1:
            logger.warning("%s uses only the first group's learning rate (%g)", name, first)
    elif kind == "adafactor":
        lr_is_adaptive = _adafactor_groups(kwargs, torch_groups, section)
        call_kwargs.update(kwargs)
        if lr_is_adaptive:
            lr = None
    if spec is not None and spec.name == "AdamW" and not {"fused", "foreach"} & kwargs.keys():
        params = [p for g in torch_groups for p in g["params"]]
        if _fused_ok(params):
            call_kwargs["fused"] = True

    try:
        optimizer = cls(torch_groups, lr=lr, **call_kwargs)
    except TypeError as err:
        raise ConfigError(
            [
                Problem(
                    key="optimizer.optimizer_args",
                    message=f"{cls.__module__}.{cls.__name__} rejected the arguments: {err}",
                    value=section.optimizer_args,
                    has_value=True,
                    hint="check the argument names against the optimizer's documentation",
                )
            ]
        ) from err

    if cls.__module__.startswith("bitsandbytes"):
        from sdtrain.engine.bnb_slices import install

        install()  # the CPU 8-bit update slice by slice: same bits, smaller temporaries
    is_schedule_free = kind == "schedulefree" or cls.__module__.startswith("schedulefree")
    if is_schedule_free and callable(getattr(optimizer, "train", None)):
        optimizer.train()
    built = BuiltOptimizer(
        optimizer=optimizer,
        name=f"{cls.__module__}.{cls.__name__}",
        args=format_kwargs(kwargs),
        group_names=[g.name for g in groups],
        is_schedule_free=is_schedule_free,
        lr_is_adaptive=lr_is_adaptive,
    )
    logger.info("optimizer: %s", built.description)
    return built
