"""Key-line location in TOML text (used by every located config error)."""

from __future__ import annotations

from sdtrain.config.toml_source import locate_keys

TEXT = '''# comment
[general]
enable_bucket = true

[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  caption = """multi
line = 3
"""
  num_repeats = 2

[[datasets]]
  [[datasets.subsets]]
  "class_tokens" = "x"
model.clip_skip = 1
'''


def test_locates_nested_arrays_and_dotted_keys():
    lines = locate_keys(TEXT)
    assert lines[("general", "enable_bucket")] == 3
    assert lines[("datasets", 0, "resolution")] == 6
    assert lines[("datasets", 0, "subsets", 0, "image_dir")] == 8
    assert lines[("datasets", 0, "subsets", 1, "image_dir")] == 10
    assert lines[("datasets", 0, "subsets", 1, "num_repeats")] == 14
    assert ("datasets", 0, "subsets", 1, "line") not in lines  # inside a multi-line string
    assert lines[("datasets", 1, "subsets", 0, "class_tokens")] == 18
    assert lines[("datasets", 1, "subsets", 0, "model", "clip_skip")] == 19
