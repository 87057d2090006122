"""Composed run configurations: the common tables plus the one method table of a subcommand.

The method tables themselves are registered by sdtrain.methods.registry (the layer above), which
builds one `CommandSchema` per method with `method_command`; the loader is handed the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, create_model, model_validator

from sdtrain.config.base import Section
from sdtrain.config.blueprint import ANY_KIND, Support
from sdtrain.config.methods import METHOD_TABLES
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


class PlanRunConfig(RunConfig):
    """`dataset plan` / `latents cache`: any run file is accepted; its method table is ignored."""

    network: dict[str, Any] | None = None
    dreambooth: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    textual_inversion: dict[str, Any] | None = None


@dataclass(frozen=True)
class CommandSchema:
    """What the loader validates a command's config against.

    name: the command ("lora", "plan"); title: how messages name it ("sdtrain train lora");
    model: the pydantic schema; support: the dataset kinds the command accepts.
    """

    name: str
    title: str
    model: type[RunConfig]
    support: Support


PLAN_COMMAND = CommandSchema("plan", "sdtrain dataset plan", PlanRunConfig, ANY_KIND)


def method_command(
    name: str, table: str, section: type[Section], support: Support
) -> CommandSchema:
    """The schema of `sdtrain train <name>`: the common tables plus [table] (a `section`)."""
    if METHOD_TABLES.get(table) != name:
        raise ValueError(f"[{table}] is not the method table of {name!r} (see METHOD_TABLES)")
    model = create_model(
        f"{name.title().replace('_', '')}RunConfig",
        __base__=RunConfig,
        __doc__=f"`sdtrain train {name}`.",
        **{table: (section, Field(default_factory=section))},  # type: ignore[call-overload]
    )
    return CommandSchema(name, f"sdtrain train {name}", model, support)
