"""`sdtrain dataset plan` through the real CLI: rich output, the JSON shape, errors, preview."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdtrain.errors import ConfigError

BLUEPRINT = """\
[general]
resolution = 512
enable_bucket = true
caption_extension = ".txt"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "train"
  class_tokens = "sks dog"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "dog"
"""


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    for name, size in {"a.jpg": (1024, 768), "b.png": (300, 200)}.items():
        (tmp_path / "train").mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 100, 50)).save(tmp_path / "train" / name)
    (tmp_path / "train" / "a.txt").write_text("sks dog, running")
    (tmp_path / "reg").mkdir()
    for i in range(10):
        Image.new("RGB", (512, 512), (20, 20 * i, 90)).save(tmp_path / "reg" / f"r{i}.png")
    (tmp_path / "train" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0junk")
    path = tmp_path / "blueprint.toml"
    path.write_text(BLUEPRINT)
    return path


def test_plan_table_output(cli, dataset, monkeypatch):
    from sdtrain.log import out

    monkeypatch.setattr(out, "width", 200)  # no wrapping inside table cells
    result = cli(
        ["dataset", "plan", str(dataset), "--train_batch_size", "2", "--max_train_steps", "10"]
    )
    assert result.exit_code == 0, result.output
    text = result.output
    for expected in (
        "datasets[0]",
        "dreambooth",
        "576x448",
        "640x384",
        "512x512",
        "reg balancing: 10 reg samples requested, 6 used to match 6 train samples",
        "broken.jpg",
        "batches per epoch: 7",
        "optimizer steps per epoch: 7",
        "epochs: 2, total optimizer steps: 10",
        "<command line>",
        "[general] (blueprint.toml:4)",
        "invalid image",
    ):
        assert expected in text, expected


def test_plan_json_shape(cli, dataset):
    result = cli(["dataset", "plan", str(dataset), "--json", "--train_batch_size", "4"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert isinstance(doc["batches_per_epoch"], int)
    (ds,) = doc["datasets"]
    assert ds["resolution"] == [512, 512] and ds["batch_size"] == 4
    assert ds["enable_bucket"] is True and len(ds["bucket_resolutions"]) == 17
    assert all(isinstance(b, list) and len(b) == 2 for b in ds["bucket_resolutions"])
    assert (ds["num_train_images"], ds["num_reg_images"]) == (6, 6)
    assert ds["batches"] == sum(b["batches"] for b in ds["buckets"]) == doc["batches_per_epoch"]
    for bucket in ds["buckets"]:
        assert set(bucket) == {"resolution", "samples", "batches"}
    images = {Path(i["path"]).name: i for i in ds["images"]}
    assert set(images) == {"a.jpg", "b.png"} | {f"r{i}.png" for i in range(10)}
    a = images["a.jpg"]
    assert a == {
        **a,
        "is_reg": False,
        "num_repeats": 3,
        "original_size": [1024, 768],
        "bucket": [576, 448],
        "resized_size": [597, 448],
        "caption": "sks dog, running",
    }
    assert Path(a["path"]).is_absolute()
    assert images["b.png"]["caption"] == "sks dog"
    assert [images[f"r{i}.png"]["num_repeats"] for i in range(10)] == [1] * 6 + [0] * 4
    assert ds["invalid_images"][0]["path"].endswith("broken.jpg")


def test_plan_config_errors_are_located(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[general]\nresolution = "512"\n[[datasets]]\n  [[datasets.subsets]]\n  image_dri = "x"\n'
    )
    with pytest.raises(ConfigError) as info:
        cli(["dataset", "plan", str(bad)])
    located = [(p.location(), p.key, p.hint) for p in info.value.problems]
    assert (f"{bad}:2", "general.resolution", None) in located
    assert (f"{bad}:5", "datasets[0].subsets[0].image_dri", "did you mean `image_dir`?") in located
    with pytest.raises(ConfigError):
        cli(["dataset", "plan", str(bad), "--resoluton", "512"])


def test_plan_exit_code_and_no_torch_import(dataset):
    """The plain plan path never imports torch/diffusers/transformers; config errors exit 2."""
    code = (
        "import sys; sys.argv = ['sdtrain', 'dataset', 'plan', sys.argv[1], '--json'];\n"
        "from sdtrain.cli.main import run\n"
        "try:\n    run()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy, code, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(dataset)], capture_output=True, text=True, timeout=120
    )
    assert "HEAVY [] 0" in done.stderr, done.stderr
    assert json.loads(done.stdout)["batches_per_epoch"] > 0
    bad = dataset.with_name("bad.toml")
    bad.write_text("[general]\nresolution = true\n")
    done = subprocess.run(
        [sys.executable, "-m", "sdtrain", "dataset", "plan", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "general.resolution" in done.stderr


def test_help_config_lists_dataset_keys(cli):
    result = cli(["dataset", "plan", "--help-config"])
    assert result.exit_code == 0 and "dataset_config" in result.output


def test_preview_writes_contact_sheets(cli, dataset, tmp_path):
    out = tmp_path / "preview"
    result = cli(["dataset", "plan", str(dataset), "--preview", str(out), "--flip_aug"])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    sheets = sorted(p.name for p in out.glob("*.png"))
    assert sheets == ["dataset0_512x512.png", "dataset0_576x448.png", "dataset0_640x384.png"]
    for name in sheets:
        assert name in page
    with Image.open(out / "dataset0_576x448.png") as sheet:
        assert sheet.size[0] > sheet.size[1]  # landscape tile of the landscape bucket
    assert "sks dog" in page and "r0.png" in page
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index.html").write_text("<html>mine</html>")
    from sdtrain.errors import UsageError

    with pytest.raises(UsageError):
        cli(["dataset", "plan", str(dataset), "--preview", str(tmp_path / "other")])
