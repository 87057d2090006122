"""`sdtrain metadata merge|clean` through the real CLI: files written, inputs never clobbered."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sdtrain.errors import UsageError


def flat(text: str) -> str:
    """Terminal output without whitespace (rich wraps long log lines at the console width)."""
    return "".join(text.split())


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    root.mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (8, 8)).save(root / f"{stem}.png")
    (root / "a.caption").write_text("a young woman\n", encoding="utf-8")
    (root / "a.txt").write_text("1girl, shirt, white_shirt\n", encoding="utf-8")
    (root / "b.txt").write_text("1boy\n", encoding="utf-8")
    return root


def _read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_merge_then_clean_round_trip(cli, folder, tmp_path):
    meta = tmp_path / "meta.json"
    result = cli(["metadata", "merge", str(folder), str(meta)])
    assert result.exit_code == 0
    assert _read(meta) == {
        "a.png": {"caption": "a young woman", "tags": "1girl, shirt, white_shirt"},
        "b.png": {"tags": "1boy"},
    }
    assert flat("1 images have no caption file") in flat(result.output)
    clean = tmp_path / "clean.json"
    cli(["metadata", "clean", str(meta), str(clean)])
    assert _read(clean) == {
        "a.png": {"caption": "a girl", "tags": "1girl, white shirt"},
        "b.png": {"tags": "1boy"},
    }
    assert _read(meta)["a.png"]["caption"] == "a young woman"


def test_merge_full_path_tags_only_into_in_json(cli, folder, tmp_path):
    start = tmp_path / "start.json"
    start.write_text(json.dumps({"/other/x.png": {"caption": "kept"}}), encoding="utf-8")
    out = tmp_path / "out.json"
    cli(
        [
            "metadata",
            "merge",
            str(folder),
            str(out),
            "--in_json",
            str(start),
            "--full_path",
            "--no-captions",
        ]
    )
    merged = _read(out)
    assert merged["/other/x.png"] == {"caption": "kept"}
    assert merged[str((folder / "a.png").resolve())] == {"tags": "1girl, shirt, white_shirt"}
    assert len(merged) == 3
    assert _read(start) == {"/other/x.png": {"caption": "kept"}}


def test_merge_existing_output_needs_a_flag(cli, folder, tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"z.png": {"caption": "old"}}), encoding="utf-8")
    with pytest.raises(UsageError, match="already exists"):
        cli(["metadata", "merge", str(folder), str(meta)])
    result = cli(
        [
            "metadata",
            "merge",
            str(folder),
            str(meta),
            "--in-place",
            "--no-tags",
            "--caption_extension",
            ".caption",
        ]
    )
    assert set(_read(meta)) == {"z.png", "a.png"}
    assert _read(tmp_path / "meta.json.bak") == {"z.png": {"caption": "old"}}
    assert flat("previous version kept as") in flat(result.output)
    cli(["metadata", "merge", str(folder), str(meta), "--overwrite", "--no-captions"])
    assert set(_read(meta)) == {"a.png", "b.png"}


def test_merge_needs_something_to_merge(cli, folder, tmp_path):
    with pytest.raises(UsageError, match="nothing to merge"):
        cli(
            [
                "metadata",
                "merge",
                str(folder),
                str(tmp_path / "m.json"),
                "--no-tags",
                "--no-captions",
            ]
        )


def test_clean_dry_run_shows_the_diff_and_writes_nothing(cli, tmp_path):
    meta = tmp_path / "meta.json"
    original = {"a.png": {"caption": "a woman", "tags": "solo, shirt, white_shirt"}}
    meta.write_text(json.dumps(original), encoding="utf-8")
    before = meta.read_bytes()
    result = cli(["metadata", "clean", str(meta), "--dry-run"])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "@@ a.png [tags]",
        "- solo, shirt, white_shirt",
        "+ solo, white shirt",
        "@@ a.png [caption]",
        "- a woman",
        "+ a girl",
    ]
    assert meta.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_clean_in_place_keeps_a_backup(cli, tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a.png": {"caption": "a lady"}}), encoding="utf-8")
    with pytest.raises(UsageError, match="no output"):
        cli(["metadata", "clean", str(meta)])
    with pytest.raises(UsageError, match="also the input"):
        cli(["metadata", "clean", str(meta), str(meta)])
    cli(["metadata", "clean", str(meta), "--in-place"])
    assert _read(meta) == {"a.png": {"caption": "a girl"}}
    assert _read(tmp_path / "meta.json.bak") == {"a.png": {"caption": "a lady"}}
