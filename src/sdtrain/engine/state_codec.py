"""Pickle-free state files: any nested state dict as safetensors tensors plus a JSON structure.

Optimizer, scheduler, grad-scaler and RNG states are nests of dicts, lists, tuples, numbers,
strings and tensors. `encode` replaces each tensor by a named reference and each non-JSON shape
(int dict keys, tuples) by a tagged object, so that `decode(encode(x)) == x` exactly (types, key
order, float bits). A component with tensors is written as `NAME.safetensors` with the structure
in its metadata; one without as `NAME.json`. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sdtrain.atomic import save_safetensors, write_text

STRUCTURE_KEY = "sdtrain_structure"
_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"


class StateCodecError(ValueError):
    """A state file whose structure does not decode (damaged or not written by sdtrain)."""


def encode(value: Any, tensors: dict[str, Any], path: str = "") -> Any:
    """JSON-able structure for `value`; tensors are moved into `tensors` under their path."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        name = path or "value"
        while name in tensors:  # keys holding dots could name the same path twice
            name += "+"
        tensors[name] = value.detach().cpu()
        return {_TENSOR: name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, np.generic):
        return encode(value.item(), tensors, path)
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
        items = [
            (k, encode(v, tensors, f"{path}.{k}" if path else str(k))) for k, v in value.items()
        ]
        if plain:
            return dict(items)
        return {_DICT: [[encode(k, tensors, f"{path}.key"), v] for k, v in items]}
    raise TypeError(f"cannot store a {type(value).__name__} in a state (at {path or 'top'})")


def decode(structure: Any, tensors: dict[str, Any]) -> Any:
    """The value `encode` described; StateCodecError on anything it could not have written."""
    if isinstance(structure, list):
        return [decode(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if len(structure) == 1:
            ((tag, inner),) = structure.items()
            if tag == _TENSOR:
                if inner not in tensors:
                    raise StateCodecError(f"the structure names a missing tensor {inner!r}")
                return tensors[inner]
            if tag == _TUPLE:
                return tuple(decode(v, tensors) for v in _expect_list(inner))
            if tag == _FLOAT:
                return float(inner)
            if tag == _DICT:
                return {
                    _hashable(decode(pair[0], tensors)): decode(pair[1], tensors)
                    for pair in _expect_list(inner)
                    if len(_expect_list(pair)) == 2
                }
        return {k: decode(v, tensors) for k, v in structure.items()}
    if structure is None or isinstance(structure, (bool, int, float, str)):
        return structure
    raise StateCodecError(f"unexpected {type(structure).__name__} in a state structure")


def _expect_list(value: Any) -> list:
    if not isinstance(value, list):
        raise StateCodecError("a tagged entry of the state structure is not a list")
    return value


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise StateCodecError("a dict key of the state structure is not hashable")
    return key


def write_component(folder: Path, name: str, value: Any) -> Path:
    """Write `value` as `folder/NAME.safetensors` (if it holds tensors) or `folder/NAME.json`."""
    tensors: dict[str, Any] = {}
    structure = json.dumps(encode(value, tensors), allow_nan=False)
    if tensors:
        target = folder / f"{name}.safetensors"
        save_safetensors(target, tensors, metadata={STRUCTURE_KEY: structure})
    else:
        target = folder / f"{name}.json"
        write_text(target, structure)
    return target


def component_file(folder: Path, name: str) -> Path | None:
    """The file holding component NAME in `folder` (either kind), or None."""
    for suffix in (".safetensors", ".json"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def read_component(path: Path) -> Any:
    """Read back what `write_component` wrote; StateCodecError if it is damaged or foreign."""
    try:
        if path.suffix == ".json":
            return decode(json.loads(path.read_text(encoding="utf-8")), {})
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if STRUCTURE_KEY not in metadata:
                raise StateCodecError("no sdtrain structure in its metadata")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        return decode(json.loads(metadata[STRUCTURE_KEY]), tensors)
    except StateCodecError:
        raise
    except Exception as exc:  # safetensors / JSON parse errors of a damaged file
        raise StateCodecError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
