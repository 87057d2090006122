"""Save policy: when the reference cadence saves (§9.4), retention of old saves and states, and
deletes that a kill cannot leave half-done."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from sdtrain.atomic import ensure_free_space
from sdtrain.config.sections import SavingSection
from sdtrain.engine import naming
from sdtrain.engine.state import DELETING


class SavePolicy:
    """Decides which save points a run has and which old ones fall out of the retention window."""

    def __init__(
        self,
        saving: SavingSection,
        output_dir: Path,
        output_name: str | None,
        num_epochs: int,
        total_steps: int,
        protected: Path | None = None,
    ) -> None:
        self.saving = saving
        self.output_dir = Path(output_dir)
        self.output_name = output_name
        self.num_epochs = num_epochs
        self.total_steps = total_steps
        self.protected = protected.resolve() if protected is not None else None

    def step_due(self, step: int) -> bool:
        """A periodic step save after optimizer step `step` (never the final step)."""
        every = self.saving.save_every_n_steps
        return bool(every) and step % every == 0 and step < self.total_steps

    def epoch_every(self) -> int | None:
        """Epoch save interval (save_n_epoch_ratio wins over save_every_n_epochs)."""
        if self.saving.save_n_epoch_ratio:
            return max(1, self.num_epochs // self.saving.save_n_epoch_ratio)
        return self.saving.save_every_n_epochs

    def epoch_due(self, epoch: int) -> bool:
        """A periodic save after epoch `epoch` (the last epoch is saved under the final name)."""
        every = self.epoch_every()
        return bool(every) and epoch % every == 0 and epoch < self.num_epochs

    def ensure_space(self, stem: str, params: list[Any], optimizer: dict | None) -> None:
        """DiskFullError unless the output folder has room for save `stem` (its exported
        weights, plus a state when the optimizer's state dict is given), with a margin."""
        weights = sum(p.numel() * p.element_size() for p in params)
        needed = weights + (weights + _tensor_bytes(optimizer) if optimizer is not None else 0)
        ensure_free_space(self.output_dir, int(needed * 1.05) + (1 << 20), f"save {stem}")

    @property
    def final_state(self) -> bool:
        return self.saving.save_state or self.saving.save_state_on_train_end

    def retire(self, kind: str, value: int) -> list[Path]:
        """Delete the save (and state) that falls out of the window after saving `value`.

        Works by name in the output folder, so saves written before a resume retire too, the
        state this run resumed from included (a run that writes no states keeps it). Returns the
        deleted paths.
        """
        saving = self.saving
        if kind == "epoch":
            every = self.epoch_every()
            victim = naming.epoch_to_delete(value, every, saving.save_last_n_epochs)
            state_victim = naming.epoch_to_delete(
                value, every, saving.save_last_n_epochs_state or saving.save_last_n_epochs
            )
            stem = naming.epoch_stem
        else:
            every = saving.save_every_n_steps
            victim = naming.step_to_delete(value, every, saving.save_last_n_steps)
            state_victim = naming.step_to_delete(
                value,
                every,
                saving.save_last_n_steps_state or saving.save_last_n_steps,
                is_state=True,
            )
            stem = naming.step_stem
        removed: list[Path] = []
        if victim is not None:
            old = stem(self.output_name, victim)
            for path in sorted(self.output_dir.iterdir()):
                if path.name.startswith(old + ".") or path.name == old:
                    remove(path)
                    removed.append(path)
        if state_victim is not None:
            folder = self.output_dir / naming.state_dir_name(stem(self.output_name, state_victim))
            # the state this run resumed from retires like any other once this run writes newer
            # states (it did so just before this call); only a run saving no states keeps it
            if (
                self.saving.save_state
                or self.protected is None
                or folder.resolve() != self.protected
            ):
                remove(folder)
                removed.append(folder)
        return removed


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a nested state dict."""
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.numel() * value.element_size())
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


EXPLODING = 10.0  # weight-norm growth since the run started that counts as exploding


def nonfinite_cause(
    bad_batches: list[str], mixed_precision: str, growth: float | None = None
) -> tuple[str, str]:
    """(kind, diagnosis) for consecutive non-finite steps. bad_batches: ", "-joined image paths;
    growth: the trainable weights' norm at the last finite step over their norm at the start.
    kind: "image", "fp16" or "lr"."""
    if growth is not None and growth > EXPLODING:  # then a repeated image is a coincidence
        return "lr", (
            "the trainable weights were already exploding before the first non-finite loss "
            f"(their norm grew {growth:.3g}x since the run started): the learning rate is far "
            "too high"
        )
    sets = [set(p.split(", ")) for p in bad_batches]
    repeated = set.intersection(*sets) if sets else set()
    if repeated:
        return "image", f"the same image is in every bad batch: {', '.join(sorted(repeated))}"
    if mixed_precision == "fp16":
        return "fp16", 'likely fp16 overflow: try mixed_precision = "bf16" or no_half_vae'
    return "lr", "likely a learning rate that is too high (or a corrupt image)"


def nonfinite_hint(kind: str, command: str, folder: Path, learning_rate: float | None) -> str:
    """What to change and the resume command for it: never the settings that diverged."""
    import shlex

    where = f"a state from before the first bad step is at {folder}"
    if kind == "image":
        return f"{where}; fix or remove that image, then resume with: {command} --resume {folder}"
    if kind == "fp16":
        return (
            f"{where}; resume in bf16 or fp32 with: {command} --mixed_precision bf16 "
            f"--resume_allow_changes training.mixed_precision --resume {folder}"
        )
    parts, kept, skip = shlex.split(command), [], False
    for part in parts:
        if skip:
            skip = False
        elif part in ("--learning_rate", "--learning-rate"):
            skip = True
        elif not part.startswith(("--learning_rate=", "--learning-rate=")):
            kept.append(part)
    lower = f"{learning_rate / 10:g}" if learning_rate else "<a lower value>"
    now = f" (now {learning_rate:g})" if learning_rate else ""
    return (
        f"{where}; lower the learning rate{now} and resume with: "
        f"{' '.join(shlex.quote(p) for p in kept)} --learning_rate {lower} "
        f"--resume_allow_changes optimizer.learning_rate --resume {folder}"
    )


def remove(path: Path) -> None:
    """Delete a file, or a folder by first renaming it to a hidden name (so a kill mid-delete
    never leaves a half-deleted state under its final name; leftovers are tidied later)."""
    if path.is_dir():
        hidden = path.parent / f".{path.name}{DELETING}{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.replace(path, hidden)
        except OSError:
            return
        shutil.rmtree(hidden, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
