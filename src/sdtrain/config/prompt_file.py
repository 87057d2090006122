"""Sample-prompt files (.txt inline options, .toml and .json prompt lists) -> PromptSpec records.

Formats follow the reference toolkit (behaviour spec §10.2). Deliberate differences, each an
error where the reference silently did something surprising:

* Only the pieces *after* the prompt are parsed as options ([quirk]: the reference also matched the
  prompt piece itself, so a prompt starting with "w 100 ..." set the width).
* An unknown option (`--x`), an option without a value or a value that does not parse is a
  ConfigError naming the file and line; the reference logged and ignored it.
* An unknown sampler name (`--ss`) is a ConfigError; the reference silently used DDIM.
* A line whose first non-blank character is `#` is a comment (the reference only checked the very
  first character of the line).
* Options for other architectures (`--g`, `--ctr`, `--rcfg`, `--fs`) are accepted and ignored with
  a warning, as in the reference; `--cn` (ControlNet) is an error, since sdtrain has no ControlNet.
* Steps outside [1, 1000] are clamped (as the reference) with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

from sdtrain.config.sections import SamplerName
from sdtrain.config.toml_source import parse_config_text
from sdtrain.errors import ConfigError, Problem

logger = logging.getLogger(__name__)

SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
MIN_SIDE = 64
MAX_STEPS = 1000
MIN_STEPS = {"pndm": 4}  # diffusers' PNDM warm-up (PRK) needs 4 timesteps


@dataclass(frozen=True)
class PromptSpec:
    """One sample prompt with every generation setting resolved (seed None = a fresh random seed).

    `index` is the prompt's position in its file (used in sample file names); `source` is
    "file:line" (or "file: entry N") for messages.
    """

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    scale: float = 7.5
    seed: int | None = None
    sampler: str = "ddim"
    index: int = 0
    source: str = ""


@dataclass(frozen=True)
class PromptDefaults:
    """Settings used where a prompt does not give its own (the reference's defaults)."""

    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    scale: float = 7.5
    seed: int | None = None
    sampler: str = "ddim"


class _Bad(ValueError):
    """A malformed option; the message is shown to the user with the location."""


def _side(value: int, name: str) -> int:
    """Floor to a multiple of 8, at least 64 (reference behaviour)."""
    if value <= 0:
        raise _Bad(f"{name} must be positive, got {value}")
    return max(MIN_SIDE, value - value % 8)


def _steps(value: int, where: str) -> int:
    clamped = max(1, min(MAX_STEPS, value))
    if clamped != value:
        logger.warning(
            "%s: steps %d clamped to %d (allowed 1..%d)", where, value, clamped, MAX_STEPS
        )
    return clamped


def _sampler(value: str) -> str:
    name = value.strip().lower()
    if name not in SAMPLER_NAMES:
        raise _Bad(f"unknown sampler '{value.strip()}'; valid: {', '.join(SAMPLER_NAMES)}")
    return name


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _Bad(f"--{name} needs a whole number, got '{text}'") from None


def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Bad(f"--{name} needs a number, got '{text}'") from None


# inline flag -> PromptSpec field (None: accepted for other architectures and ignored)
_INLINE: dict[str, str | None] = {
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "steps",
    "l": "scale",
    "n": "negative_prompt",
    "ss": "sampler",
    "g": None,
    "ctr": None,
    "rcfg": None,
    "fs": None,
}


def _apply(fields: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Validate one setting (already converted from text or taken from TOML/JSON) into `fields`."""
    if key in ("width", "height"):
        fields[key] = _side(_typed(value, int, key), key)
    elif key == "steps":
        fields[key] = _steps(_typed(value, int, key), where)
    elif key == "seed":
        seed = _typed(value, int, key)
        if seed < 0:
            raise _Bad(f"seed must be >= 0, got {seed}")
        fields[key] = seed
    elif key == "scale":
        fields[key] = float(_typed(value, (int, float), key))
    elif key == "sampler":
        fields[key] = _sampler(_typed(value, str, key))
    else:  # prompt, negative_prompt
        fields[key] = _typed(value, str, key)


def _typed(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(f"{key} must be a {names}, got {value!r}")
    return value


def parse_prompt_line(line: str, where: str = "<prompt>") -> dict[str, Any]:
    """Parse `prompt --n neg --w 512 ...` into PromptSpec field values (raises _Bad)."""
    pieces = line.split(" --")
    fields: dict[str, Any] = {"prompt": pieces[0].strip()}
    for piece in pieces[1:]:
        flag, _, text = piece.strip().partition(" ")
        flag, text = flag.lower(), text.strip()
        if flag == "cn":
            raise _Bad("--cn (ControlNet image) is not supported by sdtrain")
        if flag not in _INLINE:
            known = ", ".join(f"--{name}" for name, key in _INLINE.items() if key)
            raise _Bad(f"unknown option '--{flag}' (known: {known})")
        if not text:
            raise _Bad(f"option --{flag} needs a value")
        key = _INLINE[flag]
        if key is None:
            logger.warning("%s: --%s is for other model architectures; ignored", where, flag)
            continue
        if key in ("width", "height", "seed", "steps"):
            value: Any = _int(text, flag)
        elif key == "scale":
            value = _float(text, flag)
        else:
            value = text
        _apply(fields, key, value, where)
    return fields


# TOML/JSON dict keys (the reference's internal names) -> PromptSpec field
_DICT_KEYS: dict[str, str | None] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "sample_steps": "steps",
    "scale": "scale",
    "seed": "seed",
    "sample_sampler": "sampler",
    "guidance_scale": None,
    "cfg_trunc_ratio": None,
    "renorm_cfg": None,
    "flow_shift": None,
}


def _parse_dict(entry: dict[str, Any], where: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "controlnet_image":
            raise _Bad("controlnet_image is not supported by sdtrain")
        if key not in _DICT_KEYS:
            raise _Bad(
                f"unknown key '{key}' (known: {', '.join(k for k, v in _DICT_KEYS.items() if v)})"
            )
        target = _DICT_KEYS[key]
        if target is None:
            logger.warning("%s: %s is for other model architectures; ignored", where, key)
            continue
        _apply(fields, target, value, where)
    if "prompt" not in fields:
        raise _Bad("missing 'prompt'")
    return fields


def _base(defaults: PromptDefaults) -> PromptSpec:
    """The defaults as a PromptSpec template; bad defaults raise ConfigError (command line)."""
    try:
        return PromptSpec(
            prompt="",
            negative_prompt=defaults.negative_prompt,
            width=_side(defaults.width, "width"),
            height=_side(defaults.height, "height"),
            steps=defaults.steps,
            scale=defaults.scale,
            seed=defaults.seed,
            sampler=_sampler(defaults.sampler),
        )
    except _Bad as exc:
        key = "sample_sampler" if "sampler" in str(exc) else "width/height"
        raise ConfigError(
            [Problem(key=key, message=str(exc))], hint="check the sampler / size settings"
        ) from None


def _spec(fields: dict[str, Any], base: PromptSpec, index: int, where: str) -> PromptSpec:
    spec = replace(base, **fields, index=index, source=where)
    if spec.steps < MIN_STEPS.get(spec.sampler, 1):
        raise _Bad(
            f"sampler {spec.sampler} needs at least {MIN_STEPS[spec.sampler]} steps, "
            f"got {spec.steps}"
        )
    return spec


def _problem(path: Path, message: str, line: int | None = None, key: str = "") -> Problem:
    return Problem(key=key, message=message, file=str(path), line=line)


_HINT = (
    "prompt lines look like: a photo of a cat --n blurry --w 512 --h 512 --d 42 --l 7.5 "
    "--s 30 --ss euler_a"
)


def _read_txt(path: Path, text: str, defaults: PromptDefaults) -> list[PromptSpec]:
    base = _base(defaults)
    specs: list[PromptSpec] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            specs.append(_spec(parse_prompt_line(line, where), base, len(specs), where))
        except _Bad as exc:
            problems.append(_problem(path, str(exc), number))
    if problems:
        raise ConfigError(problems, hint=_HINT)
    return specs


def _entries(path: Path, text: str) -> list[tuple[Any, str, int | None]]:
    """(entry, label, line) of a JSON list or of a TOML `[prompt]` + `[[prompt.subset]]` file."""
    doc = parse_config_text(path, text)
    data = doc.data
    if path.suffix.lower() == ".json":
        if not isinstance(data, list):
            raise ConfigError(
                [_problem(path, "a JSON prompt file must be a list of prompts")],
                hint='write [{"prompt": "a cat", "width": 512}, "a dog --d 1"]',
            )
        return [(entry, f"entry {i + 1}", None) for i, entry in enumerate(data)]
    table = data.get("prompt")
    hint = '[prompt] with shared keys, then [[prompt.subset]] entries with prompt = "..."'
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise ConfigError(
            [_problem(path, "expected a [prompt] table with [[prompt.subset]] entries")], hint=hint
        )
    unknown = sorted(set(data) - {"prompt"})
    if unknown:
        raise ConfigError(
            [_problem(path, f"unknown top-level table(s): {', '.join(unknown)}")], hint=hint
        )
    shared = {k: v for k, v in table.items() if k != "subset"}
    entries = []
    for i, subset in enumerate(table["subset"]):
        line = doc.lines.get(("prompt", "subset", i))
        merged = {**shared, **subset} if isinstance(subset, dict) else subset
        entries.append((merged, f"subset {i + 1}", line))
    return entries


def prompt_from_text(
    text: str, defaults: PromptDefaults | None = None, where: str = "--prompt"
) -> PromptSpec:
    """One PromptSpec from a prompt given on the command line (inline `--n`/`--w`/... allowed)."""
    base = _base(defaults or PromptDefaults())
    try:
        return _spec(parse_prompt_line(text.strip(), where), base, 0, where)
    except _Bad as exc:
        raise ConfigError(
            [Problem(key="prompt", message=str(exc), file=where)], hint=_HINT
        ) from None


def read_prompt_file(path: Path | str, defaults: PromptDefaults | None = None) -> list[PromptSpec]:
    """Read a .txt, .toml or .json prompt file; every problem is reported at once as ConfigError.

    .txt: one prompt per line with inline options; .toml: `[prompt]` shared keys merged under each
    `[[prompt.subset]]`; .json: a list of dicts (reference key names) or of .txt-style strings.
    """
    path = Path(path)
    defaults = defaults or PromptDefaults()
    if not path.is_file():
        raise ConfigError(
            [_problem(path, f"prompt file not found: {path}")],
            hint="check [sample].sample_prompts / --from-file",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([_problem(path, f"cannot read prompt file: {exc}")]) from exc
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise ConfigError(
            [_problem(path, f"unsupported prompt file type '{path.suffix}'")],
            hint="use .txt (one prompt per line), .toml or .json",
        )
    specs = (
        _read_txt(path, text, defaults) if suffix == ".txt" else _read_list(path, text, defaults)
    )
    if not specs:
        raise ConfigError([_problem(path, "the prompt file contains no prompts")], hint=_HINT)
    return specs


def _read_list(path: Path, text: str, defaults: PromptDefaults) -> list[PromptSpec]:
    base = _base(defaults)
    entries = _entries(path, text)
    specs: list[PromptSpec] = []
    problems: list[Problem] = []
    for entry, label, line in entries:
        where = f"{path}:{line}" if line else f"{path}: {label}"
        try:
            if isinstance(entry, str):
                fields = parse_prompt_line(entry.strip(), where)
            elif isinstance(entry, dict):
                fields = _parse_dict(entry, where)
            else:
                raise _Bad(
                    f"a prompt must be a string or a table/object, got {type(entry).__name__}"
                )
            specs.append(_spec(fields, base, len(specs), where))
        except _Bad as exc:
            message = str(exc) if line else f"{label}: {exc}"
            problems.append(_problem(path, message, line))
    if problems:
        raise ConfigError(problems, hint=_HINT)
    return specs
