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
class Conditioning:
    """What `Method.condition` returns and the model family turns into UNet kwargs.

    hidden_states: (B, L, D) text conditioning (SD1/SD2: the only part).
    extra: family-specific tensors, e.g. SDXL's pooled text embeddings and size/crop time ids
        (the family's `unet_kwargs` decides what it reads).
    layer_states: XTI ("P+"): one (B, L, D) per UNet cross-attention site in the reference order
        (down blocks, mid, up blocks; 16 for SD1/SD2), or None for the plain path.
    """

    hidden_states: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_states: list[torch.Tensor] | None = None


@dataclass
class StepInfo:
    """The step context method hooks receive.

    global_step: optimizer steps done before this one (in `after_step`: including it).
    epoch: the 1-based epoch the step belongs to.
    generator: a CPU generator seeded from (seed, "method", global_step, micro-step position),
        never from the rank: draws a method makes with it (TI templates) are reproducible and
        resume exactly.
    """

    global_step: int
    epoch: int
    generator: torch.Generator


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

    def condition(self, bundle: ModelBundle, batch: Batch, step: StepInfo) -> Conditioning:
        """Conditioning for the batch (hidden states (B, L, D) plus family extras; XTI adds
        per-layer states). TI overrides token handling here."""
        ...

    def loss_weights(self, batch: Batch) -> torch.Tensor | None:
        """Per-sample loss multipliers (B,), e.g. prior_loss_weight on reg samples; None = ones."""
        ...

    def after_step(self, bundle: ModelBundle, step: StepInfo) -> dict[str, Any]:
        """Hook after each optimizer step (max-norm, EMA); returns metrics (floats or 0-d
        tensors, read on the host with the step's other values).

        A method whose after_step is harmless on a skipped update (it changes nothing, or
        nothing a skipped step would make wrong) sets `after_step_any_outcome = True`: with
        host_sync deferred (engine/host_sync.py) it then runs before the outcome is known, and
        its metrics are recorded for applied steps only. Without it the run reads every step."""
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
