"""`sdtrain latents cache` through the real CLI: a later `train lora` does no VAE work, edits and
VAE changes re-encode exactly what changed, --verify (missing vs stale, exit code), refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrain.errors import ConfigError

RUN = """\
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"

[training]
output_dir = "out"
max_train_steps = 2
seed = 3
cache_latents_to_disk = true
latent_cache_dir = "latents"
vae_batch_size = 2
max_data_loader_n_workers = 2
{training}
[network]
network_dim = 4

[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
caption_extension = ".txt"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "imgs"
  {subset}
"""


def make_run(root: Path, training: str = "", subset: str = "flip_aug = true") -> Path:
    (root / "imgs").mkdir()
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(64, 64), (64, 128), (128, 64)]):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "imgs" / f"p{i}.png")
        (root / "imgs" / f"p{i}.txt").write_text(f"a picture {i}")
    run = root / "run.toml"
    run.write_text(RUN.format(training=training, subset=subset))
    return run


def cached_files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted((root / "latents").rglob("*.safetensors"))}


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    from sdtrain.log import out

    monkeypatch.setattr(out, "width", 300)


def test_after_caching_training_does_not_call_the_vae_encoder(cli, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    run = make_run(tmp_path, training='mixed_precision = "bf16"')
    result = cli(["latents", "cache", str(run)])
    assert result.exit_code == 0, result.output
    assert "6 latents needed: 6 encoded, 0 already cached" in result.output
    assert "(bfloat16, cpu)" in result.output
    assert len(cached_files(tmp_path)) == 6

    def no_vae(*_args, **_kwargs):
        raise AssertionError("training called the VAE encoder")

    monkeypatch.setattr(AutoencoderKL, "encode", no_vae)
    trained = cli(["train", "lora", str(run)])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "out" / "last.safetensors").is_file()
    assert len(cached_files(tmp_path)) == 6


def test_editing_one_image_reencodes_only_it_and_a_new_vae_everything(cli, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from sdtrain.models.builtin import load_builtin

    run = make_run(tmp_path)
    assert "6 encoded" in cli(["latents", "cache", str(run)]).output
    again = cli(["latents", "cache", str(run)])
    assert "6 latents needed: 0 encoded, 6 already cached" in again.output

    path = tmp_path / "imgs" / "p2.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[5, 5] = 255 - pixels[5, 5]
    Image.fromarray(pixels).save(path)
    edited = cli(["latents", "cache", str(run)])
    assert "6 latents needed: 2 encoded, 4 already cached" in edited.output  # p2 and its flip

    vae: AutoencoderKL = copy.deepcopy(load_builtin("builtin:tiny-sd1").vae)
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.05)
    vae.save_pretrained(tmp_path / "other_vae")
    swapped = cli(["latents", "cache", str(run), "--vae", str(tmp_path / "other_vae")])
    assert swapped.exit_code == 0, swapped.output
    assert "6 latents needed: 6 encoded, 0 already cached" in swapped.output
    assert len(cached_files(tmp_path)) == 6 + 2 + 6


def test_verify_reports_missing_and_stale_entries_without_writing(cli, tmp_path):
    run = make_run(tmp_path, subset="")
    empty = cli(["latents", "cache", str(run), "--verify"])
    assert empty.exit_code == 1
    assert "3 latents needed: 0 cached, 3 missing, 0 stale" in empty.output
    assert cached_files(tmp_path) == {}

    assert cli(["latents", "cache", str(run)]).exit_code == 0
    ok = cli(["latents", "cache", str(run), "--verify"])
    assert ok.exit_code == 0, ok.output
    assert "3 cached, 0 missing, 0 stale" in ok.output

    files = sorted((tmp_path / "latents").rglob("*.safetensors"))
    files[0].unlink()
    files[1].write_bytes(b"not a latent file")
    before = cached_files(tmp_path)
    checked = cli(["latents", "cache", str(run), "--verify"])
    assert checked.exit_code == 1
    assert "1 cached, 1 missing, 1 stale" in checked.output
    assert "missing: " in checked.output and "stale: " in checked.output
    assert cached_files(tmp_path) == before

    repaired = cli(["latents", "cache", str(run)])
    assert "2 encoded, 1 already cached (1 stale entries replaced)" in repaired.output


def test_uncacheable_subsets_are_named_before_any_model_loads(cli, tmp_path, monkeypatch):
    import sdtrain.models.load as load

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(load, "load_bundle", no_model)
    run = make_run(tmp_path, subset="color_aug = true\n  random_crop = true")
    with pytest.raises(ConfigError) as caught:
        cli(["latents", "cache", str(run)])
    message = caught.value.problems[0].message
    assert "datasets[0].subsets[0]" in message and "random_crop, color_aug" in message


def test_help_and_help_config(cli):
    shown = cli(["latents", "cache", "--help"])
    assert shown.exit_code == 0 and "--verify" in shown.output
    keys = cli(["latents", "cache", "--help-config"])
    assert keys.exit_code == 0 and "latent_cache_dir" in keys.output
