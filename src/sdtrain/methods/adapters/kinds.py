"""Adapter kinds behind one small registry: LoRA now; LoHa / LoKr / DoRA later (through peft).

A kind names the [network] network_module values that select it, the class that injects its
modules into the adapter roots a model family names (`family.adapter_roots(bundle)`), and the
module that owns its file key map (kohya / LyCORIS names, reading, writing, loading into a live
network). A new kind = its injection class and key-map module in methods/adapters + one entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from sdtrain.errors import ConfigError, Problem


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind: `network` is "module:Class" (with `create(unet, text_encoder, spec)`),
    `key_map` the module with read / save / state_dict / load_into / file_ranks."""

    name: str
    network_modules: tuple[str, ...]
    network: str
    key_map: str

    def network_class(self) -> Any:
        module, _, name = self.network.partition(":")
        return getattr(importlib.import_module(module), name)

    def keys(self) -> ModuleType:
        """The module owning this kind's file key map."""
        return importlib.import_module(self.key_map)


ADAPTERS: dict[str, AdapterKind] = {
    kind.name: kind
    for kind in (
        AdapterKind(
            name="lora",
            network_modules=("networks.lora", "lora"),  # LoRA-LierLa, C3Lier with conv_dim
            network="sdtrain.methods.adapters.lora:LoraNetwork",
            key_map="sdtrain.methods.adapters.kohya",
        ),
    )
}


def adapter_kind(network_module: str) -> AdapterKind:
    """The kind a [network] network_module selects; an unknown one is a ConfigError."""
    for kind in ADAPTERS.values():
        if network_module in kind.network_modules:
            return kind
    known = sorted(m for kind in ADAPTERS.values() for m in kind.network_modules)
    raise ConfigError(
        [
            Problem(
                key="network.network_module",
                message=f"unknown adapter {network_module!r}; valid: {', '.join(known)}",
            )
        ]
    )
