"""The method registry: one entry per `sdtrain train <method>`.

An entry is everything the product needs to know about a method: the CLI command and its help,
the method's config table and section class (which make the command's schema, its
`--help-config` listing and its dataset rules), the dataset kinds it trains, and where its
builder lives. Adding a method = its file (a `build(config, plan) -> Method` function next to the
Method class), its config section (sdtrain.config.methods) and one entry below.

This module imports only the standard library: the CLI builds its commands from it (and
`sdtrain --help` must stay fast). Section classes and builders are named "module:attribute" and
imported when a command's schema is needed or a run starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdtrain.config.base import Section
    from sdtrain.config.blueprint import Support
    from sdtrain.config.run import CommandSchema, RunConfig
    from sdtrain.data.plan import Plan
    from sdtrain.methods.base import Method


def _resolve(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class MethodEntry:
    """One training method.

    name: the subcommand (`sdtrain train <name>`); summary: its one-line CLI help; usage: the
    CLI epilog (everyday options); table / section: its run-TOML table and section class
    ("module:Class", a sdtrain.config Section);
    dreambooth / finetune / dropout: which dataset kinds (and caption dropout) it accepts;
    builder: "module:function" taking (validated run config, plan) and returning the Method.
    """

    name: str
    summary: str
    table: str
    section_ref: str
    builder: str
    dreambooth: bool = True
    finetune: bool = True
    dropout: bool = True
    usage: str = ""

    @property
    def section(self) -> type[Section]:
        """The section class of this method's table."""
        return _resolve(self.section_ref)

    @cached_property
    def command(self) -> CommandSchema:
        """The config schema of `sdtrain train <name>` (common tables + this method's table)."""
        from sdtrain.config.blueprint import Support
        from sdtrain.config.run import method_command

        support = Support(
            self.dreambooth, self.finetune, self.dropout, f"sdtrain train {self.name}"
        )
        return method_command(self.name, self.table, self.section, support)

    def build(self, config: RunConfig, plan: Plan) -> Method:
        """The Method for a validated run config and its data plan (imports the method now)."""
        return _resolve(self.builder)(config, plan)


_LORA_USAGE = """
Everyday options (any key of the run schema works as --key value;
--help-config lists them all):
  --pretrained_model_name_or_path PATH   --output_dir DIR
  --output_name NAME   --max_train_steps N   --max_train_epochs N
  --train_batch_size N   --learning_rate LR   --network_dim N
  --network_alpha A   --mixed_precision no|bf16|fp16   --seed N
  --cache_latents   --save_every_n_epochs N   --save_state
  --resume PATH|auto
"""

_TI_USAGE = """
Everyday options (any key of the run schema works as --key value;
--help-config lists them all):
  --token_string T   --num_vectors_per_token N   --init_word WORD
  --xti   --use_object_template   --use_style_template
  --weights FILE   --save_model_as safetensors|pt|ckpt
  --pretrained_model_name_or_path PATH   --output_dir DIR
  --max_train_steps N   --learning_rate LR   --seed N
Captions must contain T (or use a template flag); T becomes "T T1 ...".
"""

_FULL_USAGE = """
Everyday options (any key of the run schema works as --key value;
--help-config lists them all):
  --pretrained_model_name_or_path PATH   --output_dir DIR
  --output_name NAME   --max_train_steps N   --train_batch_size N
  --learning_rate LR   --learning_rate_te LR   --save_precision fp16
  --save_model_as ckpt|safetensors|diffusers|diffusers_safetensors
  --gradient_checkpointing   --mixed_precision bf16
  --optimizer_type Adafactor   --fused_backward_pass   --ema_decay 0.999
  --cache_latents   --save_state   --resume PATH|auto
"""

METHODS: dict[str, MethodEntry] = {
    entry.name: entry
    for entry in (
        MethodEntry(
            name="lora",
            summary="Train a kohya-compatible LoRA: sdtrain train lora RUN.toml [--key value ...]",
            table="network",
            section_ref="sdtrain.config.methods:NetworkSection",
            builder="sdtrain.methods.lora:build",
            usage=_LORA_USAGE,
        ),
        MethodEntry(
            name="ti",
            summary="Train a Textual Inversion embedding (or XTI with --xti): "
            "sdtrain train ti RUN.toml [--key value ...]",
            table="textual_inversion",
            section_ref="sdtrain.config.methods:TextualInversionSection",
            builder="sdtrain.methods.ti:build",
            dropout=False,
            usage=_TI_USAGE,
        ),
        MethodEntry(
            name="dreambooth",
            summary="Full DreamBooth (U-Net + text encoder): "
            "sdtrain train dreambooth RUN.toml [--key value ...]",
            table="dreambooth",
            section_ref="sdtrain.config.methods:DreamBoothSection",
            builder="sdtrain.methods.dreambooth:build",
            finetune=False,
            usage=_FULL_USAGE,
        ),
        MethodEntry(
            name="finetune",
            summary="Full fine-tune on metadata captions: "
            "sdtrain train finetune RUN.toml [--key value ...]",
            table="finetune",
            section_ref="sdtrain.config.methods:FinetuneSection",
            builder="sdtrain.methods.finetune:build",
            dreambooth=False,
            usage=_FULL_USAGE,
        ),
    )
}


def command_schema(name: str) -> CommandSchema:
    """The config schema of a method's command, or of "plan" (`dataset plan`, `latents cache`)."""
    from sdtrain.config.run import PLAN_COMMAND

    if name == PLAN_COMMAND.name:
        return PLAN_COMMAND
    return METHODS[name].command


def method_of(config: RunConfig) -> MethodEntry | None:
    """The registered method whose table a run config carries (`dataset plan` and `latents
    cache` read any run file); None when it has none, or a table of an unregistered method."""
    from sdtrain.config.methods import METHOD_TABLES

    for table, name in METHOD_TABLES.items():
        if getattr(config, table, None) is not None and name in METHODS:
            return METHODS[name]
    return None


def plan_support(config: RunConfig) -> Support:
    """The dataset kinds `dataset plan` checks a run file against: its method's (a DreamBooth
    run refuses fine-tune subsets as training would), or every kind without a method table."""
    from sdtrain.config.run import PLAN_COMMAND

    entry = method_of(config)
    return entry.command.support if entry is not None else PLAN_COMMAND.support
