"""What the captioners share: image listing, background decoding, the batch loop, the summary."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

from PIL import Image

from sdtrain.data.scan import find_images
from sdtrain.data.transforms import load_image
from sdtrain.errors import DataError, SdtrainError

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Background decode threads used when the user does not choose: up to 4, one per core."""
    return max(1, min(4, os.cpu_count() or 1))


def list_images(folders: Sequence[Path], recursive: bool = False) -> list[Path]:
    """Every image in `folders` (sub-folders too when `recursive`), sorted per folder, no repeats.

    Raises DataError for a folder that does not exist and when no image is found at all.
    """
    images: list[Path] = []
    seen: set[Path] = set()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(
                f"image folder not found: {folder}", hint="check the path (it must be a folder)"
            )
        for image in find_images(folder, recursive=recursive):
            key = image.resolve()
            if key not in seen:
                seen.add(key)
                images.append(image)
    if not images:
        names = ", ".join(str(f) for f in folders)
        hint = "images must end in .png .jpg .jpeg .webp or .bmp"
        if not recursive:
            hint += "; add --recursive to include sub-folders"
        raise DataError(f"no images found in {names}", hint=hint)
    return images


def output_path(image: Path, extension: str) -> Path:
    """The text file written beside `image`: its name without the image suffix, plus `extension`."""
    return image.with_name(image.stem + extension)


def split_existing(
    images: Sequence[Path], extension: str, keep_existing: bool
) -> tuple[list[Path], list[Path]]:
    """(to process, skipped): with `keep_existing`, images whose output file exists are skipped."""
    if not keep_existing:
        return list(images), []
    todo: list[Path] = []
    skipped: list[Path] = []
    for image in images:
        (skipped if output_path(image, extension).exists() else todo).append(image)
    return todo, skipped


def load_rgb(path: Path) -> Image.Image:
    """Decode an image as training sees it (EXIF-upright), RGB, transparency composited on white.

    The reference drops the alpha channel, leaving whatever colour hides under transparent
    pixels; the taggers are documented to expect transparency on white. Raises DataError.
    """
    try:
        with Image.open(path) as probe:  # header only: is there any transparency to composite?
            transparent = probe.has_transparency_data
    except Exception:
        transparent = False  # load_image raises the proper DataError below
    image = load_image(path, with_alpha=transparent)
    if not transparent:
        return image
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    return canvas.convert("RGB")


@dataclass(frozen=True)
class Decoded(Generic[T]):
    """One image after background decoding: its value, or the reason it could not be read."""

    path: Path
    value: T | None
    error: str | None = None


def _decode_one(path: Path, decode: Callable[[Path], T]) -> Decoded[T]:
    try:
        return Decoded(path, decode(path))
    except SdtrainError as error:
        cause = error.__cause__
        return Decoded(path, None, f"cannot read image: {cause}" if cause else error.message)
    except Exception as error:  # one bad image must never stop the run
        return Decoded(path, None, f"cannot read image: {type(error).__name__}: {error}")


def decode_in_background(
    paths: Iterable[Path], decode: Callable[[Path], T], workers: int, window: int | None = None
) -> Iterator[Decoded[T]]:
    """Decode `paths` in `workers` threads while the caller consumes results, in input order.

    At most `window` images (default 4 per worker) are decoded ahead. `workers <= 0` decodes in
    the calling thread. PIL and numpy release the GIL for the heavy parts, so threads suffice.
    """
    if workers <= 0:
        for path in paths:
            yield _decode_one(path, decode)
        return
    from concurrent.futures import ThreadPoolExecutor

    window = window or 4 * workers
    pending_paths = iter(paths)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtrain-decode")
    try:
        pending = deque(pool.submit(_decode_one, p, decode) for p in islice(pending_paths, window))
        while pending:
            result = pending.popleft().result()
            following = next(pending_paths, None)
            if following is not None:
                pending.append(pool.submit(_decode_one, following, decode))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class CaptionSummary:
    """What a captioning run did: files written, images skipped, images that failed and why."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def report(self, logger: logging.Logger = LOGGER) -> None:
        """Log the counts, then one warning line per failed image with its reason."""
        logger.info(
            "written %d, skipped %d, failed %d",
            len(self.written),
            len(self.skipped),
            len(self.failed),
        )
        if self.skipped:
            logger.info("skipped images already have an output file (--overwrite replaces them)")
        for path, reason in self.failed:
            logger.warning("failed %s: %s", path, reason)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form of the summary."""
        return {
            "written": len(self.written),
            "skipped": len(self.skipped),
            "failed": [{"path": str(p), "reason": r} for p, r in self.failed],
        }


class _BackgroundWriter(Generic[R]):
    """Runs `write` calls in a few threads and records each outcome in a summary, in order.

    Atomic writes fsync the file and its folder (several ms each); overlapping them with decoding
    and inference roughly doubles the throughput of a fast tagger.
    """

    def __init__(
        self, write: Callable[[Path, R], None], summary: CaptionSummary, threads: int = 2
    ) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self._write = write
        self._summary = summary
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdtrain-write")
        self._pending: deque[tuple[Path, Future[None]]] = deque()
        self._backlog = 16 * threads

    def submit(self, path: Path, result: R) -> None:
        """Queue one write; settle finished (or, past the backlog, the oldest) writes."""
        self._pending.append((path, self._pool.submit(self._write, path, result)))
        while self._pending and (len(self._pending) > self._backlog or self._pending[0][1].done()):
            self._settle()

    def close(self) -> None:
        """Wait for every queued write and record it."""
        try:
            while self._pending:
                self._settle()
        finally:
            self._pool.shutdown(wait=True)

    def _settle(self) -> None:
        path, future = self._pending.popleft()
        try:
            future.result()
        except (OSError, ValueError) as error:  # ValueError: an undecodable old file
            self._summary.failed.append((path, f"cannot write output: {error}"))
        else:
            self._summary.written.append(path)


def run_batches(
    images: Sequence[Path],
    decode: Callable[[Path], T],
    infer: Callable[[list[T]], Sequence[R]],
    write: Callable[[Path, R], None],
    *,
    batch_size: int,
    workers: int,
    description: str,
    summary: CaptionSummary,
) -> None:
    """Decode `images` in the background, run `infer` on full batches, `write` each result.

    `write` runs in background threads and must be thread-safe (write one file, nothing shared).
    Images that cannot be decoded or whose output cannot be written are recorded in
    `summary.failed` and the run goes on; errors raised by `infer` itself (a broken model, out of
    memory) are not about one image and propagate. Progress shows images/s.
    """
    from sdtrain.log import progress

    batch: list[Decoded[T]] = []
    start = time.perf_counter()
    writer: _BackgroundWriter[R] = _BackgroundWriter(write, summary)
    with progress() as bar:
        task = bar.add_task(description, total=len(images), info="")
        handled = 0

        def advance(count: int) -> None:
            nonlocal handled
            handled += count
            rate = handled / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=count, info=f"{rate:.1f} img/s")

        def flush() -> None:
            outputs = infer([item.value for item in batch])  # type: ignore[misc]
            for item, result in zip(batch, outputs, strict=True):
                writer.submit(item.path, result)
            advance(len(batch))
            batch.clear()

        try:
            for item in decode_in_background(images, decode, workers):
                if item.error is not None:
                    summary.failed.append((item.path, item.error))
                    advance(1)
                    continue
                batch.append(item)
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
        finally:
            writer.close()
