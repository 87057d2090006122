"""Shared pieces of the full-model run tests (tests/run/test_train_full*.py): the DreamBooth and
fine-tune run configs, the tiny image folders (`run_dir`) and the `captured` fixture that keeps
the loaded bundle and its weights as loaded (the VAE's before latent caching frees it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DB = """
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"

[training]
output_dir = "out"
output_name = "db"
max_train_steps = 4
train_batch_size = 2
seed = 3
max_data_loader_n_workers = 0

[optimizer]
learning_rate = 1e-3

[dreambooth]
learning_rate_te = 1e-4

[saving]
save_every_n_steps = 2

[general]
resolution = 64
caption_extension = ".txt"

[[datasets]]
[[datasets.subsets]]
image_dir = "imgs"
num_repeats = 2

[[datasets.subsets]]
image_dir = "reg"
is_reg = true
class_tokens = "pattern"
"""

FT = """
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"

[training]
output_dir = "out"
output_name = "ft"
max_train_steps = 3
train_batch_size = 2
seed = 5
max_data_loader_n_workers = 0

[optimizer]
learning_rate = 1e-3

[finetune]

[general]
resolution = 64

[[datasets]]
[[datasets.subsets]]
metadata_file = "imgs/meta.json"
image_dir = "imgs"
"""


def _images(folder: Path, count: int, caption: str, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{caption} {i}")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    _images(tmp_path / "imgs", 3, "shs pattern", 0)
    _images(tmp_path / "reg", 2, "pattern", 1)
    meta = {f"{i}.png": {"caption": f"a pattern {i}", "tags": "blue, square"} for i in range(3)}
    (tmp_path / "imgs" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "db.toml").write_text(DB)
    (tmp_path / "ft.toml").write_text(FT)
    return tmp_path


@pytest.fixture
def captured(monkeypatch):
    import sdtrain.models.load as load

    box: dict = {}
    real = load.load_bundle

    def keep(*args, with_vae=None, **kwargs):
        def snapshot(vae):  # before latent caching may release or park it (models/load.py)
            box["vae"] = {f"vae.{n}": p.detach().clone() for n, p in vae.named_parameters()}
            if with_vae is not None:
                with_vae(vae)

        bundle = real(*args, with_vae=snapshot, **kwargs)
        box["bundle"] = bundle
        box["before"] = {
            f"{part}.{name}": p.detach().clone()
            for part in ("unet", "text_encoder")
            for name, p in getattr(bundle, part).named_parameters()
        }
        box["before"].update(box["vae"])
        return bundle

    monkeypatch.setattr(load, "load_bundle", keep)
    return box


def _tiny_config() -> str:
    from sdtrain.models.families import config_dir

    return str(config_dir("tiny-sd1"))
