"""Composed run configurations: the common tables plus the one method table of a subcommand."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from sdtrain.config.base import Section
from sdtrain.config.methods import NetworkSection
from sdtrain.config.sections import (
    DatasetSection,
    LoggingSection,
    ModelSection,
    OptimizerSection,
    SampleSection,
    SavingSection,
    TrainingSection,
)


class RunConfig(Section):
    """Tables every command understands. `general`/`datasets` hold an inline dataset blueprint,
    validated by sdtrain.config.blueprint (it needs the dataset kind to pick the schema)."""

    model: ModelSection = Field(default_factory=ModelSection)
    dataset: DatasetSection = Field(default_factory=DatasetSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    saving: SavingSection = Field(default_factory=SavingSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    general: dict[str, Any] | None = Field(None, description="inline blueprint [general] table")
    datasets: list[dict[str, Any]] | None = Field(
        None, description="inline blueprint [[datasets]] tables"
    )

    @model_validator(mode="after")
    def _dataset_source(self) -> RunConfig:
        inline = self.general is not None or self.datasets is not None
        if inline and self.dataset.dataset_config:
            raise ValueError(
                "give the dataset blueprint either inline ([general]/[[datasets]]) "
                "or as dataset.dataset_config, not both"
            )
        return self


class LoraRunConfig(RunConfig):
    """`sdtrain train lora`."""

    network: NetworkSection = Field(default_factory=NetworkSection)


class PlanRunConfig(RunConfig):
    """`dataset plan` / `latents cache`: any run file is accepted; its method table is ignored."""

    network: NetworkSection | None = None
    dreambooth: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    textual_inversion: dict[str, Any] | None = None


COMMAND_SCHEMAS: dict[str, type[RunConfig]] = {
    "lora": LoraRunConfig,
    "plan": PlanRunConfig,
}

COMMAND_TITLES: dict[str, str] = {
    "lora": "sdtrain train lora",
    "plan": "sdtrain dataset plan",
}
