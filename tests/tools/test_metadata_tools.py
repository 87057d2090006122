"""Metadata JSON tools: merge keys and reports, output rules, the reference's cleaning rules."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sdtrain.errors import DataError, UsageError
from sdtrain.tools.cleaning import clean_caption, clean_tags
from sdtrain.tools.metadata import (
    Change,
    choose_output,
    clean_metadata,
    dump_metadata,
    format_changes,
    load_metadata,
    merge_text_files,
    save_metadata,
)

SOURCES = {"caption": ".caption", "tags": ".txt"}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.webp"):
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "a.caption").write_text("a girl\nsecond line\n", encoding="utf-8")
    (root / "a.txt").write_text("1girl, solo\n", encoding="utf-8")
    (root / "b.txt").write_text("1boy", encoding="utf-8")
    (root / "sub" / "c.caption").write_text("  a cat  ", encoding="utf-8")
    return root


# --- cleaning: golden outputs of the reference's rules ------------------------------------------

TAG_GOLDEN = [
    (
        "1girl, solo, long_hair, white_shirt, shirt, ^_^, rating:safe",
        "1girl, solo, long hair, white shirt, ^_^",
    ),
    (
        "2girls, multiple_girls, long_hair, short_hair, blonde_hair, black_hair, blue_eyes, "
        "red_eyes, smile, twintails, ponytail, hair_ornament, star_hair_ornament",
        "2girls, multiple girls, smile, star hair ornament",
    ),
    ("2boys, short_hair, black_hair, brown_hair, long_sleeves", "2boys, short hair, long sleeves"),
    (
        "1girl, blonde_hair, black_hair, blue_eyes, red_eyes",
        "1girl, blonde hair, black hair, blue eyes, red eyes",
    ),
    ("1girl, rating:safe, rating:questionable", "1girl"),
    ("", ""),
]

CAPTION_GOLDEN = [
    ("a cartoon image of a young woman", "an image of a girl"),
    ("an anime woman and a person", "an girl and a girl"),
    ("people with females", "girls with girls"),
    ("anime anime anime girl girl girl", "girl"),
    ("a female is a male", "a girl is a male"),
]


@pytest.mark.parametrize(("tags", "cleaned"), TAG_GOLDEN)
def test_clean_tags_golden(tags, cleaned):
    assert clean_tags(tags) == cleaned


@pytest.mark.parametrize(("caption", "cleaned"), CAPTION_GOLDEN)
def test_clean_caption_golden(caption, cleaned):
    assert clean_caption(caption) == cleaned


def test_clean_metadata_reports_changes_and_missing_fields():
    metadata = {
        "x.png": {"tags": "1girl, shirt, white_shirt", "caption": "a woman", "image_size": [8, 8]},
        "y.png": {"tags": "solo"},
        "z.png": {"caption": "a cat", "tags": "a, rating:s, rating:q"},
    }
    cleaned, report = clean_metadata(metadata)
    assert cleaned["x.png"] == {
        "tags": "1girl, white shirt",
        "caption": "a girl",
        "image_size": [8, 8],
    }
    assert metadata["x.png"]["caption"] == "a woman"  # the input is not modified
    assert [(c.key, c.field) for c in report.changes] == [
        ("x.png", "tags"),
        ("x.png", "caption"),
        ("z.png", "tags"),
    ]
    assert report.missing_captions == ["y.png"] and report.missing_tags == []
    assert report.multiple_ratings == ["z.png"]


def test_format_changes_is_a_readable_diff():
    lines = format_changes([Change("k.png", "caption", "a woman\nline 2", "a girl\nline 2")])
    assert lines == ["@@ k.png [caption]", "- a woman", "- line 2", "+ a girl", "+ line 2"]


# --- merge ---------------------------------------------------------------------------------------


def test_merge_relative_keys_keep_the_extension(folder):
    merged, report = merge_text_files({}, folder, SOURCES)
    assert merged == {
        "a.png": {"caption": "a girl\nsecond line", "tags": "1girl, solo"},
        "b.jpg": {"tags": "1boy"},
    }
    assert report.added == 2 and report.updated == 0
    assert [p.name for p in report.missing["caption"]] == ["b.jpg"]
    assert report.missing["tags"] == []


def test_merge_recursive_relative_and_full_path(folder):
    merged, report = merge_text_files({}, folder, {"caption": ".caption"}, recursive=True)
    assert list(merged) == ["a.png", "sub/c.webp"]
    assert merged["sub/c.webp"] == {"caption": "a cat"}
    assert report.images == 3
    merged, _ = merge_text_files({}, folder, {"tags": ".txt"}, full_path=True)
    assert list(merged) == [str((folder / "a.png").resolve()), str((folder / "b.jpg").resolve())]


def test_merge_keeps_untouched_entries_and_other_fields(folder):
    base = {
        "a.png": {"caption": "old", "image_size": [8, 8]},
        "/elsewhere/z.png": {"caption": "keep me"},
    }
    merged, report = merge_text_files(base, folder, {"caption": ".caption"})
    assert merged["a.png"] == {"caption": "a girl\nsecond line", "image_size": [8, 8]}
    assert merged["/elsewhere/z.png"] == {"caption": "keep me"}
    assert base["a.png"]["caption"] == "old"
    assert (report.added, report.updated, report.untouched) == (0, 1, 1)


def test_merge_moves_reference_bare_stem_keys(folder):
    base = {"a": {"caption": "old", "train_resolution": [512, 512]}, "b": {"tags": "x"}}
    merged, report = merge_text_files(base, folder, {"tags": ".txt"})
    assert list(merged) == ["a.png", "b.jpg"]
    assert merged["a.png"] == {
        "caption": "old",
        "train_resolution": [512, 512],
        "tags": "1girl, solo",
    }
    assert sorted(report.migrated) == [("a", "a.png"), ("b", "b.jpg")]


def test_merge_ambiguous_stems_are_left_alone(folder):
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    merged, report = merge_text_files({"a": {"caption": "old"}}, folder, {"tags": ".txt"})
    assert merged["a"] == {"caption": "old"} and not report.migrated


def test_merge_reports_unreadable_files(folder):
    (folder / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    merged, report = merge_text_files({}, folder, {"tags": ".txt"})
    assert "b.jpg" not in merged
    assert [p.name for p, _ in report.unreadable] == ["b.txt"]


def test_merge_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        merge_text_files({}, tmp_path / "nope", SOURCES)


# --- files ---------------------------------------------------------------------------------------


def test_load_and_save_round_trip_with_backup(tmp_path):
    path = tmp_path / "meta.json"
    data = {"é.png": {"caption": "ü\nx", "image_size": [1, 2]}}
    assert save_metadata(path, data) is None
    assert load_metadata(path) == data
    assert path.read_text(encoding="utf-8") == dump_metadata(data)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    backup = save_metadata(path, {})
    assert backup == tmp_path / "meta.json.bak" and load_metadata(backup) == data
    assert load_metadata(path) == {}


def test_load_metadata_rejects_other_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="not fine-tune metadata"):
        load_metadata(path)
    path.write_text("{oops")
    with pytest.raises(DataError, match="cannot read"):
        load_metadata(path)


def test_choose_output_rules(tmp_path):
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    new = tmp_path / "new.json"
    assert choose_output(None, new, in_place=False, overwrite=False) == new
    assert choose_output(existing, new, in_place=False, overwrite=False) == new
    with pytest.raises(UsageError, match="already exists"):
        choose_output(None, existing, in_place=False, overwrite=False)
    assert choose_output(None, existing, in_place=True, overwrite=False) == existing
    assert choose_output(None, existing, in_place=False, overwrite=True) == existing
    with pytest.raises(UsageError, match="also the input"):
        choose_output(existing, existing, in_place=False, overwrite=True)
    assert choose_output(existing, existing, in_place=True, overwrite=False) == existing
    assert choose_output(existing, None, in_place=True, overwrite=False) == existing
    with pytest.raises(UsageError, match="no output"):
        choose_output(existing, None, in_place=False, overwrite=False)
