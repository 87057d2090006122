"""Shared captioner machinery: listing, background decoding, alpha compositing, the batch loop."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrain.errors import DataError
from sdtrain.tools.caption.common import (
    CaptionSummary,
    decode_in_background,
    list_images,
    load_rgb,
    output_path,
    run_batches,
    split_existing,
)


def _touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4)).save(folder / name)


def test_list_images_sorted_recursive_and_deduplicated(tmp_path):
    _touch_images(tmp_path, ["b.png", "a.JPG"])
    _touch_images(tmp_path / "sub", ["c.webp"])
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images([tmp_path])] == ["a.JPG", "b.png"]
    found = list_images([tmp_path, tmp_path / "sub", tmp_path], recursive=True)
    assert [p.name for p in found] == ["a.JPG", "b.png", "c.webp"]


def test_list_images_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_images([tmp_path / "missing"])
    (tmp_path / "sub").mkdir()
    _touch_images(tmp_path / "sub", ["x.png"])
    with pytest.raises(DataError, match="no images") as info:
        list_images([tmp_path])
    assert "--recursive" in info.value.hint


def test_output_path_and_split_existing(tmp_path):
    image = tmp_path / "a.b.png"
    assert output_path(image, ".txt") == tmp_path / "a.b.txt"
    assert output_path(image, "_tags.txt") == tmp_path / "a.b_tags.txt"
    other = tmp_path / "c.jpg"
    (tmp_path / "a.b.txt").write_text("old")
    assert split_existing([image, other], ".txt", keep_existing=True) == ([other], [image])
    assert split_existing([image, other], ".txt", keep_existing=False) == ([image, other], [])


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_decode_in_background_keeps_order_and_reports_errors(workers):
    paths = [Path(f"{i}.png") for i in range(20)]

    def decode(path: Path) -> int:
        index = int(path.stem)
        if index == 7:
            raise OSError("broken file")
        return index * 10

    results = list(decode_in_background(paths, decode, workers=workers, window=4))
    assert [r.path for r in results] == paths
    assert [r.value for r in results if r.error is None] == [i * 10 for i in range(20) if i != 7]
    assert "broken file" in results[7].error and results[7].value is None


def test_decode_runs_in_worker_threads():
    names: set[str] = set()

    def decode(path: Path) -> str:
        names.add(threading.current_thread().name)
        return path.name

    list(decode_in_background([Path(f"{i}") for i in range(8)], decode, workers=2))
    assert names and all(name.startswith("sdtrain-decode") for name in names)


def test_load_rgb_composites_transparency_on_white(tmp_path):
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black
    image.save(tmp_path / "a.png")
    pixels = np.asarray(load_rgb(tmp_path / "a.png"))
    assert pixels.tolist() == [[[255, 0, 0], [255, 255, 255]]]
    palette = Image.new("P", (1, 1), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_rgb(tmp_path / "p.png")).tolist() == [[[255, 255, 255]]]


def test_run_batches_skips_bad_images_and_batches_the_rest(tmp_path):
    _touch_images(tmp_path, [f"{i}.png" for i in range(5)])
    (tmp_path / "2.png").write_bytes(b"not an image")
    images = sorted(tmp_path.glob("*.png"))
    batches: list[int] = []
    written: dict[str, str] = {}

    def infer(batch):
        batches.append(len(batch))
        return [f"size {image.size}" for image in batch]

    summary = CaptionSummary()
    run_batches(
        images,
        load_rgb,
        infer,
        lambda p, r: written.__setitem__(p.name, r),
        batch_size=2,
        workers=2,
        description="test",
        summary=summary,
    )
    assert batches == [2, 2]
    assert sorted(written) == ["0.png", "1.png", "3.png", "4.png"]
    assert [p.name for p, _ in summary.failed] == ["2.png"]
    assert "cannot read image" in summary.failed[0][1]
    assert summary.to_dict()["written"] == 4


def test_run_batches_records_write_errors(tmp_path):
    _touch_images(tmp_path, ["a.png", "b.png"])

    def write(path: Path, result: str) -> None:
        if path.name == "a.png":
            raise PermissionError("read-only folder")

    summary = CaptionSummary()
    run_batches(
        sorted(tmp_path.glob("*.png")),
        load_rgb,
        lambda b: ["x"] * len(b),
        write,
        batch_size=4,
        workers=0,
        description="test",
        summary=summary,
    )
    assert [p.name for p in summary.written] == ["b.png"]
    assert "read-only folder" in summary.failed[0][1]
