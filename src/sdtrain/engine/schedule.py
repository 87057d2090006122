"""LR schedulers (§1.4): diffusers' schedule table, Adafactor's, schedule-free's, custom classes.

Every scheduler returned is a torch LR scheduler with `state_dict()`/`load_state_dict()`, so a
resumed run continues the schedule exactly.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from sdtrain.engine.kwargs import parse_kwargs
from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    from sdtrain.config.sections import OptimizerSection

logger = logging.getLogger(__name__)

# name -> what the schedule needs besides the optimizer; the functions are diffusers'.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "constant": (),
    "constant_with_warmup": ("warmup",),
    "linear": ("warmup", "total"),
    "cosine": ("warmup", "total"),
    "cosine_with_restarts": ("warmup", "total", "cycles"),
    "polynomial": ("warmup", "total", "power"),
    "piecewise_constant": (),  # step_rules="1:10,0.1:20,0.01" via lr_scheduler_args
    "adafactor": (),  # Adafactor's own step size (forced with relative_step, as the reference)
}


def _constant_factor(_: int) -> float:
    return 1.0


def _problem(key: str, message: str, hint: str, value: Any = None) -> ConfigError:
    return ConfigError(
        [Problem(key=key, message=message, value=value, has_value=value is not None, hint=hint)]
    )


def warmup_steps(section: OptimizerSection, total_steps: int, num_processes: int = 1) -> int:
    """lr_warmup_steps as steps; a value < 1 is a ratio of total_steps × num_processes."""
    value = section.lr_warmup_steps
    if isinstance(value, float) and value < 1:
        return int(value * total_steps * num_processes)
    return int(value)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The bare optimizer (unwraps accelerate's AcceleratedOptimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    cls = type(optimizer)
    return (
        cls.__name__ == "Adafactor"
        and cls.__module__.startswith("transformers")
        and bool(optimizer.defaults.get("relative_step"))
    )


def _is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__module__.startswith("schedulefree")


def _no_warmup(name: str, warmup: int, section: OptimizerSection) -> None:
    if warmup:
        raise _problem(
            "optimizer.lr_warmup_steps",
            f"{name} takes no warm-up, but lr_warmup_steps = {section.lr_warmup_steps}",
            'use lr_scheduler = "constant_with_warmup" for a warm-up then a constant LR'
            if name == "constant"
            else "set lr_warmup_steps = 0",
            section.lr_warmup_steps,
        )


def _custom(optimizer: Any, section: OptimizerSection, kwargs: dict[str, Any]) -> LRScheduler:
    path = section.lr_scheduler_type or ""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError as err:
        raise _problem(
            "optimizer.lr_scheduler_type",
            f"cannot import {module_name!r} ({err})",
            "give a class in torch.optim.lr_scheduler (e.g. StepLR) or a dotted module.Class",
            path,
        ) from err
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise _problem(
            "optimizer.lr_scheduler_type",
            f"{path!r} is not a scheduler class",
            "give a class in torch.optim.lr_scheduler (e.g. StepLR) or a dotted module.Class",
            path,
        )
    try:
        scheduler = cls(optimizer, **kwargs)
    except TypeError as err:
        raise _problem(
            "optimizer.lr_scheduler_args",
            f"{path} rejected the arguments: {err}",
            "check lr_scheduler_args against the scheduler's documentation",
            section.lr_scheduler_args,
        ) from err
    if not (hasattr(scheduler, "state_dict") and hasattr(scheduler, "load_state_dict")):
        raise _problem(
            "optimizer.lr_scheduler_type",
            f"{path} has no state_dict()/load_state_dict(), so a run could not resume",
            "use a torch.optim.lr_scheduler.LRScheduler subclass",
            path,
        )
    return scheduler


def build_lr_scheduler(
    optimizer: Any, section: OptimizerSection, total_steps: int, num_processes: int = 1
) -> LRScheduler:
    """The LR scheduler for `optimizer` over `total_steps` optimizer steps.

    As in the reference, the schedule length is total_steps × num_processes (accelerate steps a
    prepared scheduler once per process). A relative-step Adafactor always gets the `adafactor`
    schedule (initial LR = learning_rate), a schedule-free optimizer a constant one (it schedules
    internally). `lr_scheduler_type` builds a custom class with `lr_scheduler_args`; for the named
    schedules those args are extra keyword arguments (e.g. `lr_end` for polynomial).

    To resume: build the optimizer and this scheduler, then load the optimizer's state, then the
    scheduler's (building it sets the groups' LRs to the schedule's first value).
    """
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    inner = _inner(optimizer)
    name = section.lr_scheduler
    warmup = warmup_steps(section, total_steps, num_processes)
    kwargs = parse_kwargs(section.lr_scheduler_args, "optimizer.lr_scheduler_args")

    if _is_schedule_free(inner):
        logger.info("schedule-free optimizer: constant LR scheduler (it schedules internally)")
        return LambdaLR(optimizer, _constant_factor)
    if section.lr_scheduler_type:
        _no_warmup(section.lr_scheduler_type, warmup, section)
        return _custom(optimizer, section, kwargs)
    if _is_relative_step_adafactor(inner):
        if name != "adafactor":
            logger.info("Adafactor with relative_step: using the adafactor LR scheduler")
        name = "adafactor"
    if name not in SCHEDULES:
        raise _problem(
            "optimizer.lr_scheduler",
            f"unknown lr_scheduler {name!r}",
            f"use one of {', '.join(SCHEDULES)}, or lr_scheduler_type for a custom class",
            name,
        )
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(inner, Adafactor):
            raise _problem(
                "optimizer.lr_scheduler",
                'the adafactor scheduler only works with optimizer_type = "Adafactor"',
                'choose another lr_scheduler, or optimizer_type = "Adafactor"',
                name,
            )
        _no_warmup(name, warmup, section)
        return AdafactorSchedule(inner, section.learning_rate)

    needs = SCHEDULES[name]
    if name == "constant":
        _no_warmup(name, warmup, section)
    call: dict[str, Any] = {}
    if "warmup" in needs:
        call["num_warmup_steps"] = warmup
    if "total" in needs:
        call["num_training_steps"] = total_steps * num_processes
    if "cycles" in needs:
        call["num_cycles"] = section.lr_scheduler_num_cycles
    if "power" in needs:
        call["power"] = section.lr_scheduler_power
    function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    try:
        return function(optimizer, **call, **kwargs)
    except (TypeError, ValueError) as err:
        raise _problem(
            "optimizer.lr_scheduler_args",
            f"lr_scheduler {name} rejected its arguments: {err}",
            "check lr_scheduler_args (e.g. step_rules for piecewise_constant, lr_end for "
            "polynomial)",
            section.lr_scheduler_args,
        ) from err
