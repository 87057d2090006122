"""Textual-inversion captions: templates, `T` -> "T T1 ... T(n-1)", and the token-presence check.

The template lists are the original TI implementation's, as the reference uses them (§8.2): with
`use_object_template` / `use_style_template` every sample's caption is a template drawn with the
step's seeded generator, `{}` replaced by the expanded token. Otherwise the processed caption's `T`
is expanded; sdtrain expands whole words only (the reference replaced substrings, so `T` inside a
longer word changed too), like our sample prompts and `generate`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sdtrain.models.embeddings import contains_token, expand_tokens

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


class TiCaptions:
    """Turns a batch's processed captions into TI captions for token `token` (n strings)."""

    def __init__(self, token: str, names: list[str], templates: Sequence[str] | None) -> None:
        self.token, self.names = token, names
        self.templates = tuple(templates) if templates else None
        self.joined = " ".join(names)

    def __call__(self, captions: Sequence[str], generator: torch.Generator) -> list[str]:
        """Template captions (one draw per sample from `generator`) or expanded captions."""
        import torch

        if self.templates is None:
            return [expand_tokens(caption, self.token, self.names) for caption in captions]
        picks = torch.randint(len(self.templates), (len(captions),), generator=generator)
        return [self.templates[int(i)].format(self.joined) for i in picks]

    def expand(self, text: str) -> str:
        """`T` -> "T T1 ..." in a sample or negative prompt."""
        return expand_tokens(text, self.token, self.names)


def templates_for(use_object: bool, use_style: bool) -> tuple[str, ...] | None:
    """The template list the flags select (object wins when both are set, as the reference)."""
    if use_object:
        return OBJECT_TEMPLATES
    if use_style:
        return STYLE_TEMPLATES
    return None


def captions_without_token(entries: Iterable[tuple[str, str]], token: str) -> list[str]:
    """Paths of (path, caption) entries whose caption does not contain `token`."""
    return [path for path, caption in entries if not contains_token(caption, token)]


def warn_missing_token(paths: list[str], total: int, token: str) -> None:
    """One warning for the whole dataset: how many captions lack the token, and which."""
    if not paths:
        return
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    log.warning(
        "%d of %d captions do not contain the token '%s'; those images train nothing for it "
        "(%s). Add the token to the captions, or use use_object_template / use_style_template.",
        len(paths),
        total,
        token,
        shown,
    )
