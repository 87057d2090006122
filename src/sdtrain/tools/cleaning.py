"""The reference's cleaning rules for tags and captions (clean_captions_and_tags.py), pure python.

Outputs match the reference string for string; the rules are re-expressed on the list of tags
(the reference runs regexes over a `", a, , b, "` string, which is the same thing).
"""

from __future__ import annotations

import re

_HAIR_LENGTH = re.compile(r"(long|short|medium) hair")
# With several people in the image ("girls"/"boys" anywhere in the tags), each of these groups is
# dropped entirely when more than one of its tags is present: they cannot be attributed to anyone.
_MULTI_PERSON = (
    _HAIR_LENGTH,
    re.compile(r"(bob|hime) cut"),
    re.compile(r"[\w\-]+ eyes"),
    re.compile(r"[\w\-]+ sleeves|sleeveless"),
    re.compile(
        r"ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun"
        r"|two side up|two tails|[\w\-]+ braid|sidelocks"
    ),
)
_HAIR = re.compile(r"[\w\-]+ hair")
_SINGLE_WORD = re.compile(r"[\w\-]+|hair ornament")
_SMILEY = "^_^"

# Applied in this order, each repeated until the caption stops changing. Plain substring
# replacement, as the reference: "female" inside other words is rewritten too.
CAPTION_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
)


def count_ratings(tags: str) -> int:
    """How many DeepDanbooru `, rating...` tails a tag string has (more than 1 is suspicious)."""
    return len(tags.split(", rating")) - 1


def _drop(items: list[str], pattern: re.Pattern[str]) -> list[str]:
    return [t for t in items if not pattern.fullmatch(t)]


def clean_tags(tags: str) -> str:
    """Clean one `, `-separated tag string the way the reference does.

    1. `_` -> space (except in `^_^`); 2. everything from the first `, rating` on is removed
    (DeepDanbooru ratings); 3. with several people (`girls`/`boys` in the text): hair length,
    hair cut, eye colour, sleeves and hair-style groups with more than one tag are removed, then
    all `<word> hair` colour tags if more than one remains (hair length kept); 4. a one-word tag
    (or `hair ornament`) is removed when a longer tag ends with it (`shirt` when `white shirt`).
    """
    tags = tags.replace(_SMILEY, "\0").replace("_", " ").replace("\0", _SMILEY)
    tags = tags.split(", rating")[0]
    items = tags.split(", ")
    if "girls" in tags or "boys" in tags:
        for pattern in _MULTI_PERSON:
            if sum(1 for t in items if pattern.fullmatch(t)) > 1:
                items = _drop(items, pattern)
        colours = [t for t in items if _HAIR.fullmatch(t) and not _HAIR_LENGTH.fullmatch(t)]
        if len(colours) > 1:
            items = [t for t in items if t not in colours]
    for word in [t for t in items if _SINGLE_WORD.fullmatch(t)]:
        longer = re.compile(r"((\w+) )+" + re.escape(word))
        if any(longer.fullmatch(t) for t in items):
            items = [t for t in items if t != word]
    if not items:
        return ""
    # the reference's own re-joining (", " + ", , ".join + ", ", collapse ", , "), kept verbatim
    # so that odd inputs such as empty tags or "a,, b" come out exactly as before
    joined = (", " + ", , ".join(items) + ", ").replace(", , ", ", ")
    return joined[2:-2]


def clean_caption(caption: str) -> str:
    """Apply CAPTION_REPLACEMENTS in order, each until the caption stops changing."""
    for source, target in CAPTION_REPLACEMENTS:
        while source in caption:
            replaced = caption.replace(source, target)
            if replaced == caption:
                break
            caption = replaced
    return caption
