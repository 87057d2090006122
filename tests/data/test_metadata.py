"""Fine-tune metadata: key -> path (absolute, relative, bare stems), captions + tags, JSONL."""

from __future__ import annotations

import json

import pytest

from sdtrain.data.metadata import (
    FolderIndex,
    assemble_caption,
    metadata_entries,
    metadata_tag_frequency,
    read_metadata,
    resolve_key,
)
from sdtrain.errors import DataError


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "b.JPG", "c.jpg", "c.png", "d.v2.webp", "sub/e.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    return folder


def test_keys_absolute_relative_and_stems(images):
    index = FolderIndex()
    assert resolve_key(str(images / "a.png"), None, index) == (images / "a.png", None)
    assert resolve_key("a.png", images, index) == (images / "a.png", None)
    assert resolve_key("sub/e.png", images, index) == (images / "sub" / "e.png", None)
    # bare stems (reference merge scripts without --full_path): extension searched, any case
    assert resolve_key("a", images, index) == (images / "a.png", None)
    assert resolve_key("b", images, index) == (images / "b.JPG", None)
    assert resolve_key("d.v2", images, index) == (images / "d.v2.webp", None)
    assert resolve_key("sub/e", images, index) == (images / "sub" / "e.png", None)
    # absolute stem, too
    assert resolve_key(str(images / "a"), None, index) == (images / "a.png", None)


def test_ambiguous_stem_takes_reference_extension_order(images):
    path, problem = resolve_key("c", images, FolderIndex())
    assert (path, problem) == (images / "c.png", None)


def test_unresolvable_keys(images):
    index = FolderIndex()
    assert resolve_key("zz.png", images, index) == (images / "zz.png", "file not found")
    assert resolve_key("zz", images, index)[1] == f"no image named zz.* in {images}"
    assert resolve_key("notes", images, index)[1].startswith("no image named notes.*")
    assert resolve_key("a.png", None, index) == (
        None,
        "relative key needs image_dir in the subset (or train_data_dir)",
    )


@pytest.mark.parametrize(
    "caption,tags,wildcard,expected",
    [
        ("a girl", "1girl, solo", False, "a girl,1girl, solo"),  # reference: no space added
        ("a girl", None, False, "a girl"),
        (None, "1girl, solo", False, "1girl, solo"),
        (None, None, False, ""),
        ("line one\nline two", "t1, t2", False, "line one,t1, t2"),  # tags follow the used line
        ("line one\n\nline two", "t1\nt2", True, "line one,t1,t2\nline two,t1,t2"),
        ("", "t1, t2", True, "t1, t2"),  # reference lost the tags here (§13.7)
        ("only caption", "", True, "only caption"),
    ],
)
def test_caption_assembly(caption, tags, wildcard, expected):
    assert assemble_caption(caption, tags, ",", wildcard) == expected


def test_entries_from_json_with_sizes_and_tag_frequency(images, tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps(
            {
                "b": {"caption": "a photo", "tags": "Red, blue", "image_size": [640, 480]},
                str(images / "a.png"): {"tags": "red"},
                "missing": {"caption": "x"},
                "bad": {"caption": 3},
                "c.jpg": {"caption": "cat", "image_size": [0, 5]},
            }
        )
    )
    entries = {e.key: e for e in metadata_entries(meta, images, ",", False)}
    assert list(entries) == sorted(entries)
    assert entries["b"].path == images / "b.JPG"
    assert (entries["b"].caption, entries["b"].image_size) == ("a photo,Red, blue", (640, 480))
    assert entries[str(images / "a.png")].caption == "red"
    assert entries["missing"].problem.startswith("no image named missing.*")
    assert entries["bad"].problem == "caption must be text"
    assert entries["c.jpg"].image_size is None  # invalid sizes are ignored (read from the file)
    assert metadata_tag_frequency(list(entries.values())) == {"red": 2, "blue": 1}


def test_jsonl_and_errors(tmp_path):
    lines = tmp_path / "meta.jsonl"
    lines.write_text(
        '{"image_path": "/x/a.png", "caption": "c"}\n\n'
        '{"image_path": "/x/b.png", "tags": "t", "image_size": [8, 8]}\n'
    )
    assert set(read_metadata(lines)) == {"/x/a.png", "/x/b.png"}
    lines.write_text('{"image_path": "/x/a.png"}\n{"caption": "no path"}\n')
    with pytest.raises(DataError, match=r"meta.jsonl:2: each line must be an object"):
        read_metadata(lines)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "a": {"caption": "x",}\n}')
    with pytest.raises(DataError, match=r"broken.json:2:\d+: invalid JSON"):
        read_metadata(broken)
    with pytest.raises(DataError, match="metadata file not found"):
        read_metadata(tmp_path / "nope.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="top level must be an object"):
        read_metadata(tmp_path / "list.json")
