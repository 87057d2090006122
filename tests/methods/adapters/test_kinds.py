"""The adapter-kind registry: network_module -> kind, each kind with its injector and key map."""

from __future__ import annotations

import pytest

from sdtrain.errors import ConfigError
from sdtrain.methods.adapters.kinds import ADAPTERS, adapter_kind

KEY_MAP_FUNCTIONS = ("read", "save", "state_dict", "load_into", "file_ranks")


def test_network_modules_select_lora():
    assert adapter_kind("networks.lora") is ADAPTERS["lora"]
    assert adapter_kind("lora") is ADAPTERS["lora"]


def test_unknown_network_module_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        adapter_kind("lycoris.kohya")
    problem = info.value.problems[0]
    assert problem.key == "network.network_module" and "networks.lora" in problem.message


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_kind_has_an_injector_and_a_key_map(name):
    kind = ADAPTERS[name]
    assert callable(kind.network_class().create)
    keys = kind.keys()
    assert all(callable(getattr(keys, f)) for f in KEY_MAP_FUNCTIONS)


def test_every_network_module_of_the_config_has_a_kind():
    from typing import get_args

    from sdtrain.config.methods import NetworkSection

    annotation = NetworkSection.model_fields["network_module"].annotation
    for value in get_args(annotation):
        assert adapter_kind(value).name in ADAPTERS
