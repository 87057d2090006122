"""Reference file naming for saves and states, and the save_last_n_* retention rules (§9.4)."""

from __future__ import annotations


def epoch_stem(name: str | None, epoch: int) -> str:
    """`name-000003` (fallback name `epoch`)."""
    return f"{name or 'epoch'}-{epoch:06d}"


def step_stem(name: str | None, step: int) -> str:
    """`name-step00001000` (fallback name `at`)."""
    return f"{name or 'at'}-step{step:08d}"


def final_stem(name: str | None) -> str:
    """`name` (fallback `last`)."""
    return name or "last"


def state_dir_name(stem: str) -> str:
    """State folder of a save point: `<stem>-state`."""
    return f"{stem}-state"


def epoch_to_delete(epoch: int, every: int | None, keep_last: int | None) -> int | None:
    """Epoch whose save falls out of the window after saving `epoch` (reference rule), or None."""
    if not every or not keep_last:
        return None
    old = epoch - every * keep_last
    return old if old > 0 else None


def step_to_delete(
    step: int, every: int | None, keep_last_steps: int | None, is_state: bool = False
) -> int | None:
    """Step whose save falls out of the last-N-steps window after saving `step`, or None.

    Reference: r = step - keep_last - 1 rounded down to a multiple of `every`; models when r >= 0,
    states when r > 0. A step-0 model save does not exist, so r = 0 never names a file here.
    """
    if not every or not keep_last_steps:
        return None
    r = step - keep_last_steps - 1
    r -= r % every
    return r if r > 0 else None
