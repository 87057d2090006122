"""The Method interface the engine drives: one engine, four methods (lora, db, finetune, ti)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from sdtrain.data.batch import Batch
    from sdtrain.models.bundle import ModelBundle


@dataclass
class ParamGroup:
    """Trainable parameters with their own LR; `name` becomes the `lr/<name>` metric key."""

    name: str
    params: list[torch.nn.Parameter]
    lr: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SavePoint:
    """Where and why the engine saves: file stem (reference naming) plus counters."""

    output_dir: Path
    stem: str  # e.g. "name-000003", "name-step00001000", "name"
    epoch: int
    global_step: int
    is_final: bool
    metadata: dict[str, str] = field(default_factory=dict)  # training facts (ss_* inputs)


class Method(Protocol):
    """What the engine needs from a training method. Methods never see TOML or CLI objects."""

    name: str

    def prepare(self, bundle: ModelBundle) -> list[ParamGroup]:
        """Freeze, wrap (adapters, new tokens), move to dtype; return the trainable groups."""
        ...

    def train_text_encoder(self) -> bool:
        """True when the text encoder's output depends on trainable parameters this step."""
        ...

    def condition(self, bundle: ModelBundle, batch: Batch) -> torch.Tensor:
        """Text conditioning for the batch: (B, L, D). TI overrides token handling here."""
        ...

    def loss_weights(self, batch: Batch) -> torch.Tensor | None:
        """Per-sample loss multipliers (B,), e.g. prior_loss_weight on reg samples; None = ones."""
        ...

    def after_step(self, bundle: ModelBundle) -> dict[str, float]:
        """Hook after each optimizer step (TI restores frozen rows; max-norm); returns metrics."""
        ...

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, by stable name, for resumable states."""
        ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what trainable_state() returned."""
        ...

    def export(self, bundle: ModelBundle, point: SavePoint) -> list[Path]:
        """Write the deliverables (LoRA file, embedding, checkpoint) atomically; return paths."""
        ...

    def sampling(self, bundle: ModelBundle) -> AbstractContextManager[None]:
        """A context in which bundle's modules produce images with the current trained weights."""
        ...


def no_context() -> Iterator[None]:
    """Helper for methods whose live modules already sample with the trained weights."""
    yield
