"""Captions: reading caption files, tag counts, and the per-sample caption pipeline (§3.3, §5).

The pipeline is the reference toolkit's `process_caption`; each place where sdtrain deliberately
behaves differently says "sdtrain differs". Randomness comes only from the `random.Random` the
caller passes (seeded from seed, epoch and sample position), so a resumed run replays the same
captions and nothing touches the global `random` state (reference §13.16).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdtrain.errors import DataError

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass
class CaptionRecipe:
    """The per-subset caption keys (reference names and defaults) plus TI replacements.

    `replacements`: ordered `(from, to)` pairs applied last; `from == ""` replaces the whole caption
    with `to` (a list: one entry chosen at random). `token_warmup_step` may be a fraction of the
    run's steps in the config; resolve it with `token_warmup_steps` before processing captions.
    """

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    replacements: list[tuple[str, str | list[str]]] = field(default_factory=list)


def token_warmup_steps(recipe: CaptionRecipe, max_train_steps: int) -> int:
    """The warm-up length in steps: a value below 1 is a fraction of `max_train_steps` (floored).

    sdtrain differs: the reference overwrites the subset's value on first use; this returns it, so
    use `dataclasses.replace(recipe, token_warmup_step=...)` to get a resolved recipe.
    """
    value = recipe.token_warmup_step
    if value < 0:
        raise ValueError(f"token_warmup_step cannot be negative, got {value}")
    if value < 1:
        return math.floor(value * max_train_steps)
    return int(value)


def _join_separator(separator: str) -> str:
    # The reference always re-joins with ", ". sdtrain joins with the subset's own separator plus
    # a space, which is exactly ", " for the default "," but no longer turns custom separators
    # (";", " | ") into commas.
    return separator if separator[-1:].isspace() else separator + " "


def _split(text: str, separator: str) -> list[str]:
    # sdtrain differs: empty items are always dropped; the reference keeps them when no
    # keep_tokens_separator is used, so "a, , b" or a trailing comma became shuffled ", ," tags.
    return [t.strip() for t in text.split(separator) if t.strip()]


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    open_mark, close_mark = "⦅", "⦆"
    while open_mark in caption or close_mark in caption:
        open_mark += "⦅"
        close_mark += "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _rearrange_tags(caption: str, recipe: CaptionRecipe, rng: random.Random, step: int) -> str:
    """Step 4: fixed head / flexible middle / fixed tail, warm-up, shuffle, tag dropout, re-join."""
    separator = recipe.caption_separator
    head: list[str] = []
    tail: list[str] = []
    marker = recipe.keep_tokens_separator
    if marker and marker in caption:
        head_text, flex_text = caption.split(marker, 1)
        if marker in flex_text:
            flex_text, tail_text = flex_text.split(marker, 1)
            tail = _split(tail_text, separator)
        head = _split(head_text, separator)
        flex = _split(flex_text, separator)
    else:
        tokens = _split(caption, separator)
        keep = max(recipe.keep_tokens, 0)
        head, flex = tokens[:keep], tokens[keep:]

    warmup = recipe.token_warmup_step
    if warmup and step < warmup:
        count = math.floor(step * (len(flex) - recipe.token_warmup_min) / warmup)
        flex = flex[: count + recipe.token_warmup_min]
    if recipe.shuffle_caption:
        rng.shuffle(flex)
    if recipe.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= recipe.caption_tag_dropout_rate]
    return _join_separator(separator).join(head + flex + tail)


def process_caption(
    caption: str, recipe: CaptionRecipe, rng: random.Random, epoch: int, step: int
) -> str:
    """The caption a sample trains with this time (reference §5.1 order; `epoch` is 1-based).

    1. dropout (rate, or every n-th epoch: `epoch % n == 0`, so n = 1 drops every epoch, like the
       reference); a dropped caption is "" and nothing else runs (not even replacements);
    2. line choice: a random line with `enable_wildcard`, else the first line;
    3. prefix / suffix (joined with single spaces), then `{a|b}` wildcards (`{{`/`}}` are literal
       braces);
    4. tag rearrangement when shuffling, tag dropout or warm-up is active, or when the caption
       contains `keep_tokens_separator` (see below);
    5. secondary separator -> caption separator; 6. replacements.

    sdtrain differs:
    * prefix/suffix are attached after the line choice; the reference attaches them to the
      stored multi-line text first, so a wildcard caption lost its prefix unless line 1 was
      picked. Single-line captions are unaffected and the random draws happen in the same order.
    * a caption containing `keep_tokens_separator` is always split and re-joined, so the marker
      (e.g. `|||`) never reaches the tokenizer; the reference left it in when nothing shuffled.
    * empty tags are dropped and tags are re-joined with the subset's separator (+ a space), see
      `_split` / `_join_separator`.
    * a fractional `token_warmup_step` must be resolved first (`token_warmup_steps`): ValueError.
    """
    if 0 < recipe.token_warmup_step < 1:
        raise ValueError("resolve a fractional token_warmup_step with token_warmup_steps() first")
    dropped = recipe.caption_dropout_rate > 0 and rng.random() < recipe.caption_dropout_rate
    every = recipe.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""

    if recipe.enable_wildcard:
        if "\n" in caption:
            caption = rng.choice(caption.split("\n"))
    else:
        caption = caption.split("\n")[0]
    if recipe.caption_prefix:
        caption = recipe.caption_prefix + " " + caption
    if recipe.caption_suffix:
        caption = caption + " " + recipe.caption_suffix
    if recipe.enable_wildcard:
        caption = _expand_wildcards(caption, rng)

    marker = recipe.keep_tokens_separator
    if (
        recipe.shuffle_caption
        or recipe.token_warmup_step > 0
        or recipe.caption_tag_dropout_rate > 0
        or (marker and marker in caption)
    ):
        caption = _rearrange_tags(caption, recipe, rng, step)

    if recipe.secondary_separator:
        caption = caption.replace(recipe.secondary_separator, recipe.caption_separator)

    for source, target in recipe.replacements:
        if source == "":
            caption = rng.choice(target) if isinstance(target, list) else target
        elif isinstance(target, str):
            caption = caption.replace(source, target)
        else:
            raise ValueError(f"replacement for {source!r} must be a string, not a list")
    return caption


def caption_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """Caption files tried for an image, in order: `name<ext>`, then for face-crop names
    `base_cx_cy_w_h` (stem with >= 5 `_`-parts) `base<ext>`.

    sdtrain differs: only the file stem is split on `_`; the reference split the whole path, so
    underscores in folder names (`10_sks dog/`) could produce a wrong second candidate.
    """
    image_path = Path(image_path)
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    candidates = [image_path.with_name(image_path.stem + caption_extension)]
    parts = image_path.stem.split("_")
    if len(parts) >= 5:
        candidates.append(image_path.with_name("_".join(parts[:-4]) + caption_extension))
    return candidates


def read_caption_file(
    image_path: Path, caption_extension: str, enable_wildcard: bool
) -> str | None:
    """The stored caption of a DreamBooth-style image, or None when no caption file exists.

    First existing candidate (`caption_candidates`) wins. Without wildcards: the first line,
    stripped. With wildcards: all non-blank lines, stripped, joined with "\\n" (one is picked per
    use). A file that is not UTF-8 raises DataError; an empty one gives "" (the image trains with
    an empty caption, as in the reference; the plan warns with a count). sdtrain differs: a
    UTF-8 byte-order mark is ignored (the reference kept it as part of the first tag).
    """
    for path in caption_candidates(image_path, caption_extension):
        if path.is_file():
            break
    else:
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"caption file {path} is not valid UTF-8 (byte {exc.start})",
            "re-save it as UTF-8 (most editors offer 'Save with encoding'), e.g. "
            f"iconv -f <its encoding> -t UTF-8 '{path}' -o '{path}.utf8' and rename it back",
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read caption file {path}: {exc}", "check its permissions") from exc
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Tag counts for `ss_tag_frequency`: split on ",", stripped, lower-cased, non-empty."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
