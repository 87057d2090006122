"""DreamBooth runs with cached latents: the VAE waits on disk (parked) and comes back bit for bit
for saves and samples; class images to generate make the latents wait for the whole model."""

from __future__ import annotations

import numpy as np
import torch
from full_runs import DB, _tiny_config
from PIL import Image


def test_parked_vae_is_saved_bit_identical(run_dir, cli, captured, monkeypatch):
    """With every latent cached the VAE waits on disk during training; the save has it intact."""
    from diffusers import StableDiffusionPipeline

    import sdtrain.models.park as park

    parked: list[bool] = []
    real = park.park_weights
    monkeypatch.setattr(park, "park_weights", lambda *a: parked.append(real(*a)) or parked[-1])
    args = ["train", "dreambooth", str(run_dir / "db.toml"), "--cache_latents"]
    result = cli([*args, "--save_model_as", "safetensors"])
    assert result.exit_code == 0, result.output
    assert parked == [True]
    vae = captured["bundle"].vae
    assert vae.encoder.conv_in.weight.numel() == 0  # still parked after the run
    pipe = StableDiffusionPipeline.from_single_file(
        str(run_dir / "out" / "db.safetensors"),
        config=_tiny_config(),
        local_files_only=True,
        tokenizer=captured["bundle"].tokenizer,
        safety_checker=None,
        requires_safety_checker=False,
    )
    saved = pipe.vae.state_dict()
    for name, value in captured["before"].items():
        if name.startswith("vae."):
            assert torch.equal(saved[name.removeprefix("vae.")], value), name


def test_samples_with_the_vae_parked_equal_samples_without(run_dir, cli, monkeypatch):
    import sdtrain.models.park as park

    (run_dir / "prompts.txt").write_text("shs pattern --d 5 --s 2 --w 64 --h 64\n")
    args = ["--cache_latents", "--sample_prompts", str(run_dir / "prompts.txt")]
    args += ["--sample_every_n_steps", "2", "--sample_sampler", "euler_a"]
    parked: list[bool] = []
    real = park.park_weights
    monkeypatch.setattr(park, "park_weights", lambda *a: parked.append(real(*a)) or parked[-1])
    result = cli(["train", "dreambooth", str(run_dir / "db.toml"), *args])
    assert result.exit_code == 0, result.output
    assert parked == [True]
    (run_dir / "out").rename(run_dir / "parked")
    monkeypatch.setattr(park, "park_weights", lambda *a: False)  # kept in memory
    result = cli(["train", "dreambooth", str(run_dir / "db.toml"), *args])
    assert result.exit_code == 0, result.output
    ours = sorted((run_dir / "parked" / "sample").glob("*.png"))
    theirs = sorted((run_dir / "out" / "sample").glob("*.png"))
    assert len(ours) == len(theirs) >= 2
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name


def test_class_images_then_cached_latents(run_dir, cli, monkeypatch):
    """Class images to generate need the whole model first: latents are then cached after the
    load (not during it), the generated images included, and the VAE waits on disk."""
    import sdtrain.models.load as load
    import sdtrain.models.park as park

    hooks: list[bool] = []
    real_load = load.load_bundle

    def spy(*args, with_vae=None, **kwargs):
        hooks.append(with_vae is not None)
        return real_load(*args, with_vae=with_vae, **kwargs)

    monkeypatch.setattr(load, "load_bundle", spy)
    parked: list[bool] = []
    real = park.park_weights
    monkeypatch.setattr(park, "park_weights", lambda *a: parked.append(real(*a)) or parked[-1])
    keys = (
        'class_data_dir = "reg"\nnum_class_images = 3\nclass_prompt = "pattern"\n'
        "class_sample_steps = 2\nclass_resolution = 64\n"
    )
    (run_dir / "db.toml").write_text(DB.replace("[dreambooth]\n", "[dreambooth]\n" + keys))
    result = cli(["train", "dreambooth", str(run_dir / "db.toml"), "--cache_latents"])
    assert result.exit_code == 0, result.output
    assert hooks == [False] and parked == [True]
    assert len(list((run_dir / "reg").glob("class-*.png"))) == 1  # 2 there, 1 generated
    assert (run_dir / "out" / "db" / "model_index.json").is_file()  # a builtin saves a folder
