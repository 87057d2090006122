"""WD14 tag vocabulary and tag selection (pure python): CSV reading, name rewrites, thresholds."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdtrain.errors import ConfigError, ModelLoadError, Problem

LOGGER = logging.getLogger(__name__)

# selected_tags.csv category codes (the SmilingWolf taggers use only these three)
RATING = "9"
GENERAL = "0"
CHARACTER = "4"

RatingPlacement = Literal["none", "first", "last"]


@dataclass(frozen=True)
class TagVocabulary:
    """The model's output labels, one per output column, in CSV (= model output) order."""

    names: tuple[str, ...]
    categories: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def read_selected_tags(path: Path) -> TagVocabulary:
    """Read `selected_tags.csv` (header `tag_id,name,category,...`).

    Unlike the reference, which assumes 4 ratings, then general, then character tags, column `i`
    of the model output is simply row `i` of the CSV, whatever the category order.
    """
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(
            f"cannot read tag list {path}: {error}", hint="re-download the tagger model"
        ) from error
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise ModelLoadError(
            f"{path} is not a WD14 tag list (header must start with tag_id,name,category)",
            hint="use the selected_tags.csv that comes with the model",
        )
    body = [row for row in rows[1:] if row]
    if any(len(row) < 3 for row in body):
        raise ModelLoadError(f"{path} has rows with fewer than 3 columns", hint="re-download it")
    return TagVocabulary(tuple(r[1] for r in body), tuple(r[2].strip() for r in body))


def split_tag_list(text: str | None, separator: str) -> list[str]:
    """Split a user tag list on the stripped separator (`, ` -> `,`); items stripped, blanks out."""
    if not text:
        return []
    cut = separator.strip() or separator
    return [item.strip() for item in text.split(cut) if item.strip()]


def parse_replacements(text: str | None) -> list[tuple[str, str]]:
    """Parse `src,dst;src2,dst2` (`\\,` and `\\;` escape a literal comma / semicolon)."""
    if not text:
        return []
    comma, semicolon = "\x00c", "\x00s"
    escaped = text.replace("\\,", comma).replace("\\;", semicolon)
    pairs: list[tuple[str, str]] = []
    for part in escaped.split(";"):
        if not part.strip():
            continue
        fields = part.split(",")
        if len(fields) != 2:
            shown = part.replace(comma, "\\,").replace(semicolon, "\\;")
            raise ConfigError(
                [
                    Problem(
                        key="tag_replacement",
                        message=f"'{shown}' is not of the form source,target",
                        file="<command line>",
                        hint="separate pairs with ';', escape literal ',' or ';' with a backslash",
                    )
                ]
            )
        source, target = (f.replace(comma, ",").replace(semicolon, ";").strip() for f in fields)
        pairs.append((source, target))
    return pairs


def _expand_character(tag: str, separator: str) -> str:
    """`name_(series)` -> `name<sep>series` (only the last parenthesised group moves)."""
    if not tag.endswith(")") or "(" not in tag:
        return tag
    head, _, series = tag.rpartition("(")
    return head.removesuffix("_") + separator + series.removesuffix(")")


def prepare_names(
    vocabulary: TagVocabulary,
    *,
    separator: str,
    character_tag_expand: bool = False,
    remove_underscore: bool = False,
    replacements: Sequence[tuple[str, str]] = (),
) -> TagVocabulary:
    """Rewrite tag names before inference, in the reference's order: expand, underscores, replace.

    `remove_underscore` only touches names longer than 3 characters (keeps `^_^`). A replacement
    source is matched against the rewritten names. **[fix]** The reference's `--tag_replacement`
    does nothing for the standard models (variable shadowing); here every tag with the source name,
    in any category, gets the target name.
    """
    names = list(vocabulary.names)
    if character_tag_expand:
        names = [
            _expand_character(n, separator) if c == CHARACTER else n
            for n, c in zip(names, vocabulary.categories, strict=True)
        ]
    if remove_underscore:
        names = [n.replace("_", " ") if len(n) > 3 else n for n in names]
    for source, target in replacements:
        hits = [i for i, n in enumerate(names) if n == source]
        if not hits:
            LOGGER.warning("tag replacement: '%s' is not a tag of this model", source)
        for i in hits:
            names[i] = target
    return TagVocabulary(tuple(names), vocabulary.categories)


@dataclass(frozen=True)
class TagSelection:
    """How tags are chosen from one image's probabilities and ordered."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired: frozenset[str] = field(default_factory=frozenset)
    character_tags_first: bool = False
    rating: RatingPlacement = "none"
    always_first: tuple[str, ...] = ()


def select_tags(
    probs: Sequence[float], vocabulary: TagVocabulary, selection: TagSelection
) -> list[str]:
    """The tags of one image, in output order.

    General tags with p >= general_threshold and character tags with p >= character_threshold, in
    CSV order, minus undesired tags. With `character_tags_first` the character tags come first, in
    CSV order (**[fix]** the reference inserts each at the front, reversing them). The rating with
    the highest probability goes first or last when asked. Finally `always_first` tags that are
    present move to the front **in the order listed** (**[fix]** the reference ends up with the
    last listed tag first). Duplicate names (possible after replacements) are kept once.
    """
    if len(probs) != len(vocabulary):
        raise ModelLoadError(
            f"the model gives {len(probs)} scores but its tag list has {len(vocabulary)} tags",
            hint="the model and its selected_tags.csv do not belong together",
        )
    in_order: list[str] = []  # CSV order, i.e. the model's output order
    character: list[str] = []
    best_rating, best_p = None, float("-inf")
    for name, category, p in zip(vocabulary.names, vocabulary.categories, probs, strict=True):
        if category == RATING:
            if p > best_p:
                best_rating, best_p = name, p
        elif name in selection.undesired:
            continue
        elif category == GENERAL and p >= selection.general_threshold:
            in_order.append(name)
        elif category == CHARACTER and p >= selection.character_threshold:
            in_order.append(name)
            character.append(name)
    if selection.character_tags_first:
        tags = character + [n for n in in_order if n not in character]
    else:
        tags = in_order
    if selection.rating != "none" and best_rating and best_rating not in selection.undesired:
        tags = [best_rating, *tags] if selection.rating == "first" else [*tags, best_rating]
    tags = list(dict.fromkeys(tags))
    front = [t for t in dict.fromkeys(selection.always_first) if t in tags]
    return front + [t for t in tags if t not in front]


def append_tags(existing_text: str, new_tags: Sequence[str], separator: str) -> list[str]:
    """Existing tags of a tag file first (as written), then the new tags it does not have yet."""
    existing = split_tag_list(existing_text.strip("\n"), separator)
    return existing + [t for t in new_tags if t not in existing]
