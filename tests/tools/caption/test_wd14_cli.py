"""`sdtrain caption wd14` end to end with a tiny ONNX tagger whose scores follow the mean colour."""

from __future__ import annotations

import pytest
from tiny_captioners import write_images, write_wd14_model

RED = "red_background, long_hair, kagamine_rin"
GREEN = "long_hair, ^_^, hatsune_miku_(vocaloid), kagamine_rin"
WHITE = (
    "red_background, blue_sky, long_hair, ^_^, white_shirt, hatsune_miku_(vocaloid), kagamine_rin"
)


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "images", {"red": "red", "green": "green", "white": "white"})


def flat(text: str) -> str:
    """Terminal output without whitespace (rich wraps long log lines at the console width)."""
    return "".join(text.split())


def _tags(folder, stem, extension=".txt"):
    return (folder / f"{stem}{extension}").read_text(encoding="utf-8")


def test_default_threshold_tags_in_model_order(cli, images, wd14_model):
    result = cli(["caption", "wd14", str(images), "--model", str(wd14_model), "--batch_size", "2"])
    assert result.exit_code == 0, result.output
    assert _tags(images, "red") == RED + "\n"
    assert _tags(images, "green") == GREEN + "\n"
    assert _tags(images, "white") == WHITE + "\n"
    assert flat("written 3, skipped 0, failed 0") in flat(result.output)


def test_general_and_character_thresholds(cli, images, wd14_model):
    cli(
        [
            "caption",
            "wd14",
            str(images),
            "--model",
            str(wd14_model),
            "--general_threshold",
            "0.6",
            "--character-threshold",
            "0.95",
        ]
    )
    assert _tags(images, "red") == "red_background\n"
    assert _tags(images, "green") == "^_^, hatsune_miku_(vocaloid)\n"
    assert "kagamine_rin" not in _tags(images, "white")
    cli(
        [
            "caption",
            "wd14",
            str(images),
            "--model",
            str(wd14_model),
            "--thresh",
            "0.45",
            "--overwrite",
        ]
    )
    assert _tags(images, "green") == "long_hair, ^_^, hatsune_miku_(vocaloid)\n"


def test_underscores_undesired_replacement_and_expansion(cli, images, wd14_model):
    cli(
        [
            "caption",
            "wd14",
            str(images),
            "--model",
            str(wd14_model),
            "--remove_underscore",
            "--undesired_tags",
            "long hair",
            "--character_tag_expand",
            "--tag_replacement",
            "red background,crimson;kagamine rin,rin",
        ]
    )
    assert _tags(images, "red") == "crimson, rin\n"
    assert _tags(images, "green") == "^_^, hatsune miku, vocaloid, rin\n"


def test_order_options(cli, images, wd14_model):
    base = ["caption", "wd14", str(images), "--model", str(wd14_model), "--overwrite"]
    cli([*base, "--always_first_tags", "kagamine_rin, long_hair"])
    assert _tags(images, "red") == "kagamine_rin, long_hair, red_background\n"
    cli([*base, "--character_tags_first"])
    assert _tags(images, "green") == "hatsune_miku_(vocaloid), kagamine_rin, long_hair, ^_^\n"
    cli([*base, "--use_rating_tags"])
    assert _tags(images, "red") == "sensitive, " + RED + "\n"
    assert _tags(images, "green") == "general, " + GREEN + "\n"
    cli([*base, "--use_rating_tags_as_last_tag", "--caption_separator", " | "])
    assert _tags(images, "red") == RED.replace(", ", " | ") + " | sensitive\n"


def test_existing_files_are_kept_unless_overwrite(cli, images, wd14_model):
    (images / "red.txt").write_text("keep me\n", encoding="utf-8")
    result = cli(["caption", "wd14", str(images), "--model", str(wd14_model)])
    assert _tags(images, "red") == "keep me\n"
    assert flat("written 2, skipped 1, failed 0") in flat(result.output)
    result = cli(["caption", "wd14", str(images), "--model", str(wd14_model), "--overwrite"])
    assert _tags(images, "red") == RED + "\n"
    assert flat("written 3, skipped 0") in flat(result.output)


def test_append_keeps_existing_tags_first(cli, images, wd14_model):
    (images / "red.txt").write_text("solo, long_hair\n", encoding="utf-8")
    cli(["caption", "wd14", str(images), "--model", str(wd14_model), "--append_tags"])
    assert _tags(images, "red") == "solo, long_hair, red_background, kagamine_rin\n"
    assert _tags(images, "green") == GREEN + "\n"


def test_corrupt_image_is_reported_and_the_others_written(cli, images, wd14_model):
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    result = cli(["caption", "wd14", str(images), "--model", str(wd14_model), "--batch_size", "2"])
    assert result.exit_code == 1  # a partial run is not a success
    assert flat("1 of 4 image(s) failed") in flat(result.output)
    assert not (images / "broken.txt").exists()
    assert _tags(images, "white") == WHITE + "\n"
    assert flat("written 3, skipped 0, failed 1") in flat(result.output)
    assert flat("broken.png") in flat(result.output)


def test_fixed_batch_in_the_graph_wins(cli, tmp_path):
    model = write_wd14_model(tmp_path / "fixed", size=12, batch=2)
    images = write_images(tmp_path / "img", {"a": "red", "b": "green", "c": "white"}, (30, 30))
    result = cli(["caption", "wd14", str(images), "--model", str(model), "--batch_size", "1"])
    assert flat("fixed batch size of 2") in flat(result.output)
    assert _tags(images, "c") == WHITE + "\n"
    assert _tags(images, "a") == RED + "\n"


def test_recursive_extension_and_frequency(cli, tmp_path, wd14_model):
    root = write_images(tmp_path / "root", {"a": "red"})
    write_images(root / "sub", {"b": "green"})
    result = cli(
        [
            "caption",
            "wd14",
            str(root),
            "--model",
            str(wd14_model),
            "--recursive",
            "--caption-extension",
            ".tags",
            "--frequency_tags",
        ]
    )
    assert _tags(root, "a", ".tags") == RED + "\n"
    assert _tags(root / "sub", "b", ".tags") == GREEN + "\n"
    lines = [line for line in result.stdout.splitlines() if "long_hair" in line]
    assert lines and lines[0].split()[-2:] == ["2", "│"]


def test_mismatched_tag_list_is_a_model_error(tmp_path, cli, images, wd14_model):
    from sdtrain.errors import ModelLoadError

    model = tmp_path / "bad"
    model.mkdir()
    (model / "model.onnx").write_bytes((wd14_model / "model.onnx").read_bytes())
    (model / "selected_tags.csv").write_text("tag_id,name,category\n1,a,0\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="gives 11 scores"):
        cli(["caption", "wd14", str(images), "--model", str(model)])
