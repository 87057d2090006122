"""Sample PNGs: A1111 parameters chunk, reference file names, contact sheets."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdtrain.config.prompt_file import PromptSpec
from sdtrain.models.png import (
    SheetItem,
    contact_sheet,
    format_parameters,
    read_parameters,
    sample_num,
    sample_path,
    save_png,
    sheet_path,
)

SPEC = PromptSpec(
    prompt="a cat, (sitting:1.2)",
    negative_prompt="blurry, lowres",
    width=512,
    height=768,
    steps=28,
    scale=7.5,
    seed=None,
    sampler="euler_a",
)


def test_parameters_text_is_a1111_style() -> None:
    text = format_parameters(
        SPEC,
        42,
        "model.safetensors",
        clip_skip=2,
        extras={"LoRA": "a.safetensors:0.8", "Note": "plain"},
    )
    assert text == (
        "a cat, (sitting:1.2)\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 28, Sampler: euler_a, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        'Model: model.safetensors, Clip skip: 2, LoRA: "a.safetensors:0.8", Note: plain'
    )
    bare = PromptSpec(prompt="x", scale=4.0)
    assert format_parameters(bare, 1, clip_skip=1) == (
        "x\nSteps: 30, Sampler: ddim, CFG scale: 4, Seed: 1, Size: 512x512"
    )


def test_png_carries_parameters_and_is_written_atomically(tmp_path: Path) -> None:
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    target = tmp_path / "sub" / "img.png"
    assert save_png(target, image, "hello\nSteps: 1") == target
    assert read_parameters(target) == "hello\nSteps: 1"
    with Image.open(target) as loaded:
        assert loaded.size == (16, 8) and loaded.getpixel((0, 0)) == (10, 20, 30)
    assert [p.name for p in target.parent.iterdir()] == ["img.png"]  # no temp file left
    save_png(tmp_path / "plain.png", image)
    assert read_parameters(tmp_path / "plain.png") is None


def test_sample_names_follow_the_reference(tmp_path: Path) -> None:
    assert sample_num(epoch=3) == "e000003"
    assert sample_num(global_step=1000) == "001000"
    with pytest.raises(ValueError):
        sample_num()
    stamp = "20240102030405"
    assert sample_path(tmp_path, "name", "e000003", 0, stamp, None) == (
        tmp_path / "sample" / "name_e000003_00_20240102030405.png"
    )
    assert sample_path(tmp_path, None, "001000", 12, stamp, 7) == (
        tmp_path / "sample" / "001000_12_20240102030405_7.png"
    )
    assert sheet_path(tmp_path, "name", "001000", stamp) == (
        tmp_path / "sample" / "name_001000_sheet_20240102030405.png"
    )


def test_contact_sheet_places_every_image_with_a_label() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    items = [
        SheetItem(Image.new("RGB", (64, 48 if i else 64), c), f"prompt {i} " * 10)
        for i, c in enumerate(colours)
    ]
    sheet = contact_sheet(items, title="run 1")
    assert sheet.mode == "RGB"
    assert sheet.width >= 3 * 64 and sheet.height > 64
    found = {sheet.getpixel((x, y)) for x in range(sheet.width) for y in range(0, sheet.height, 4)}
    assert set(colours) <= found
    many = contact_sheet([SheetItem(Image.new("RGB", (8, 8)), str(i)) for i in range(10)])
    one_row = contact_sheet([SheetItem(Image.new("RGB", (8, 8)), str(i)) for i in range(8)])
    assert many.height > one_row.height and many.width == one_row.width
    with pytest.raises(ValueError):
        contact_sheet([])


def test_sample_set_names_parameters_and_sheet(tmp_path: Path) -> None:
    from sdtrain.models.png import save_sample_set
    from sdtrain.models.sampling import GeneratedImage

    seeded = PromptSpec(prompt="a dog", seed=5, index=1)
    results = [
        GeneratedImage(Image.new("RGB", (8, 8)), SPEC, 99),
        GeneratedImage(Image.new("RGB", (8, 8)), seeded, 5),
    ]
    written = save_sample_set(
        results, tmp_path, "run", "e000002", model="m", clip_skip=None, stamp="20240101000000"
    )
    assert [p.name for p in written.images] == [
        "run_e000002_00_20240101000000.png",
        "run_e000002_01_20240101000000_5.png",
    ]
    assert "Seed: 99" in read_parameters(written.images[0])
    assert written.sheet == tmp_path / "sample" / "run_e000002_sheet_20240101000000.png"
    assert written.sheet.is_file()
