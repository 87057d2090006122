"""Files others read: metadata holds base names, not local absolute paths (unless opted in), and
`model convert` keeps the source dtype unless --precision is given."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open

RUN = """
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"

[training]
output_dir = "out"
output_name = "tiny"
max_train_steps = 1
seed = 3
max_data_loader_n_workers = 0

[network]
network_dim = 4

[general]
resolution = 64
caption_extension = ".txt"

[[datasets]]
[[datasets.subsets]]
image_dir = "imgs"
"""


def _run(cli, root: Path, *flags: str) -> dict[str, str]:
    images = root / "imgs"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a photo")
    (root / "run.toml").write_text(RUN)
    result = cli(["train", "lora", str(root / "run.toml"), *flags])
    assert result.exit_code == 0, result.output
    with safe_open(str(root / "out" / "tiny.safetensors"), "pt") as handle:
        return handle.metadata()


def test_metadata_holds_base_names_unless_opted_in(cli, tmp_path):
    meta = _run(cli, tmp_path)
    local = str(tmp_path)
    leaks = {k: v for k, v in meta.items() if local in v}
    assert leaks == {}
    assert 'output_dir = "out"' in meta["sdtrain_config"]
    assert '"imgs"' in meta["sdtrain_config"] or "imgs" in meta["ss_dataset_dirs"]
    # the local config.toml keeps the real paths (it never leaves the machine)
    assert local in (tmp_path / "out" / "config.toml").read_text()
    other = tmp_path / "opted"
    other.mkdir()
    opted = _run(cli, other, "--metadata_full_paths")
    assert str(other) in opted["sdtrain_config"]


def test_model_convert_keeps_the_source_dtype(cli, tmp_path):
    from sdtrain.models.info import source_dtypes

    kept = tmp_path / "toy.safetensors"
    result = cli(["model", "convert", "builtin:toy-sd1", str(kept)])
    assert result.exit_code == 0, result.output
    assert source_dtypes("builtin:toy-sd1") == ("float16", "float16")
    assert source_dtypes(str(kept)) == ("float16", "float16")
    wide = tmp_path / "toy32.safetensors"
    assert cli(["model", "convert", str(kept), str(wide), "--precision", "float"]).exit_code == 0
    assert source_dtypes(str(wide)) == ("float32", "float32")
    assert os.path.getsize(wide) > 1.9 * os.path.getsize(kept)
    again = tmp_path / "again.safetensors"
    assert cli(["model", "convert", str(kept), str(again)]).exit_code == 0
    assert os.path.getsize(again) == os.path.getsize(kept)
