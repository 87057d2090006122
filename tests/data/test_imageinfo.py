"""Header-only image facts: sizes, EXIF orientation (as PIL's exif_transpose), corruption checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from sdtrain.data.imageinfo import UnreadableImage, read_image_info
from sdtrain.data.info_cache import CACHE_NAME, InfoCache


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_size_and_orientation_match_pil_exif_transpose(tmp_path, fmt, orientation):
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(path, fmt, exif=_exif(orientation))
    info = read_image_info(path)
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        assert info.size == upright.size
    assert info.stored_size == (40, 24)
    assert info.orientation == orientation
    assert info.transposed == (orientation != 1)
    assert info.format == fmt


def test_xmp_orientation_when_exif_has_none(tmp_path):
    path = tmp_path / "xmp.jpg"
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    Image.new("RGB", (40, 24)).save(path, "JPEG", xmp=xmp)
    with Image.open(path) as image:
        assert ImageOps.exif_transpose(image).size == (24, 40)
    assert read_image_info(path).size == (24, 40)


@pytest.mark.parametrize(
    "save",
    [
        lambda im, p: im.save(p.with_suffix(".bmp")),
        lambda im, p: im.save(p.with_suffix(".jpg"), progressive=True),
        lambda im, p: im.convert("RGBA").save(p.with_suffix(".webp"), lossless=True),
        lambda im, p: im.convert("L").save(p.with_suffix(".png")),
        lambda im, p: im.save(p.with_suffix(".gif")),  # not a parsed format: PIL's lazy open
    ],
)
def test_other_encodings(tmp_path, save):
    save(Image.new("RGB", (33, 17)), tmp_path / "img")
    (path,) = tmp_path.iterdir()
    assert read_image_info(path).size == (33, 17)


def test_format_by_content_not_extension(tmp_path):
    path = tmp_path / "actually_jpeg.png"
    Image.new("RGB", (20, 10)).save(path, "JPEG")
    info = read_image_info(path)
    assert (info.format, info.size) == ("JPEG", (20, 10))


@pytest.mark.parametrize(
    "fmt,cut,reason",
    [
        ("JPEG", 0.5, "truncated JPEG"),
        ("JPEG", 0.95, "truncated JPEG (no end-of-image marker)"),
        ("PNG", 0.5, "truncated PNG"),
        ("PNG", 0.95, "truncated PNG"),
        ("WEBP", 0.6, "truncated WebP"),
        ("BMP", 0.5, "truncated BMP"),
    ],
)
def test_truncated_files_are_detected(tmp_path, fmt, cut, reason):
    full = tmp_path / "full"
    Image.effect_noise((64, 48), 60).convert("RGB").save(full, fmt)
    data = full.read_bytes()
    broken = tmp_path / "broken"
    broken.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(UnreadableImage) as info:
        read_image_info(broken)
    assert info.value.reason.startswith(reason)


def test_empty_missing_folder_and_junk(tmp_path):
    cases = {"empty.png": b"", "junk.jpg": b"this is not an image at all"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    reasons = {}
    for name in [*cases, "missing.png", "."]:
        with pytest.raises(UnreadableImage) as info:
            read_image_info(tmp_path / name)
        reasons[name] = info.value.reason
    assert reasons == {
        "empty.png": "empty file (0 bytes)",
        "junk.jpg": "not an image file (unknown format)",
        "missing.png": "file not found",
        ".": "is a folder, not an image file",
    }


def test_jpeg_with_appended_data_is_complete(tmp_path):
    """Phones append a video after the JPEG ("motion photo"); EOI is then not at the end."""
    path = tmp_path / "motion.jpg"
    Image.new("RGB", (30, 20)).save(path, "JPEG", exif=_exif(6))
    path.write_bytes(path.read_bytes() + b"\x00\x00\x00\x18ftypmp42" + os.urandom(5000))
    assert read_image_info(path).size == (20, 30)


def test_info_cache_roundtrip_and_staleness(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (30, 20)).save(path, "JPEG", exif=_exif(8))
    info = read_image_info(path)
    cache = InfoCache(tmp_path)
    assert cache.get(path) is None
    cache.put(path, info, "a caption")
    cache.save()
    saved = (tmp_path / CACHE_NAME).read_text()
    assert '"resolution": [\n      30,\n      20\n    ]' in saved  # reference field: stored size
    assert InfoCache(tmp_path).get(path) == info
    Image.new("RGB", (50, 20)).save(path, "JPEG")  # the image changes: the entry is stale
    os.utime(path, ns=(1, 1))
    assert InfoCache(tmp_path).get(path) is None


def test_reference_cache_entries_are_not_trusted(tmp_path):
    """The reference writes no mtime, so its entries are re-read (they may be stale)."""
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    (tmp_path / CACHE_NAME).write_text(
        json.dumps({str(path): {"caption": "x", "resolution": [99, 99]}})
    )
    assert InfoCache(Path(tmp_path)).get(path) is None
