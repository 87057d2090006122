"""Pixel verification: what each stage checks of an image, and the decode check itself.

- `dataset plan` reads headers only (sizes, orientation, cheap truncation checks): seconds for
  thousands of images.
- A training run and its `--dry-run` also decode every planned image once while planning (this
  module), so an image whose header is fine but whose pixel data is broken is found before any
  weight loads: it is an invalid image like any other (refused, or left out with
  `skip_invalid_images = true`) and can never stop latent caching or a run midway.
- A file that still fails to decode during training (changed on disk after the check) stops the
  run with a state written first (engine/loop.py).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

_VERIFY: ContextVar[bool] = ContextVar("sdtrain_verify_pixels", default=False)


@contextlib.contextmanager
def verifying_pixels(enabled: bool = True) -> Iterator[None]:
    """Within the block, planning decodes every image it collects (see the module docstring)."""
    token = _VERIFY.set(enabled)
    try:
        yield
    finally:
        _VERIFY.reset(token)


def should_verify() -> bool:
    """True inside `verifying_pixels()`."""
    return _VERIFY.get()


def pixel_problem(path: Path) -> str | None:
    """None when the whole image decodes, else why not (in a few words)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        zlib.error,
        Image.DecompressionBombError,
    ) as exc:
        return f"its pixel data cannot be decoded ({exc})"
    return None
