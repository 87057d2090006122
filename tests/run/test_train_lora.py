"""`sdtrain train lora` end to end on the tiny random model: files, metrics, what changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

RUN = """
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"

[training]
output_dir = "out"
output_name = "tiny"
max_train_steps = 4
train_batch_size = 2
seed = 3
max_data_loader_n_workers = 0

[optimizer]
learning_rate = 1e-2

[network]
network_dim = 4
network_alpha = 2.0

[saving]
save_every_n_steps = 2

[general]
resolution = 64
caption_extension = ".txt"

[[datasets]]
[[datasets.subsets]]
image_dir = "imgs"
num_repeats = 2
"""


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"shs pattern, sample {i}")
    (tmp_path / "run.toml").write_text(RUN)
    return tmp_path


def test_trains_and_writes_reference_named_files(run_dir, cli, monkeypatch):
    import sdtrain.models.load as load

    captured = {}
    real = load.load_bundle

    def keep(*args, **kwargs):
        bundle = real(*args, **kwargs)
        captured["bundle"] = bundle
        captured["before"] = {
            name: p.detach().clone()
            for module in (bundle.unet, bundle.text_encoder)
            for name, p in module.named_parameters()
        }
        return bundle

    monkeypatch.setattr(load, "load_bundle", keep)
    result = cli(["train", "lora", str(run_dir / "run.toml")])
    assert result.exit_code == 0, result.output
    out = run_dir / "out"
    assert (out / "tiny-step00000002.safetensors").is_file()
    assert (out / "tiny.safetensors").is_file()
    assert (out / "config.toml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert {"lr/unet", "lr/textencoder"} <= set(records[0])

    bundle = captured["bundle"]
    changed, lora_changed = [], []
    for module in (bundle.unet, bundle.text_encoder):
        for name, param in module.named_parameters():
            base = name.replace(".base_layer", "")
            if "lora_" in name:
                if name in captured["before"]:
                    continue
                lora_changed.append(name)
            elif not torch.equal(
                param.detach(), captured["before"].get(base, captured["before"].get(name))
            ):
                changed.append(name)
    assert changed == []
    assert lora_changed

    with safe_open(str(out / "tiny.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(
        k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
        for k in keys
    )
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0"
    assert meta["ss_seed"] == "3"
    assert "sdtrain_config" in meta and "[network]" in meta["sdtrain_config"]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_dry_run_loads_no_weights(run_dir, cli, monkeypatch):
    import sdtrain.models.load as load

    def refuse(*args, **kwargs):
        raise AssertionError("dry run must not load the model")

    monkeypatch.setattr(load, "load_bundle", refuse)
    result = cli(["train", "lora", str(run_dir / "run.toml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not (run_dir / "out").exists()


def test_config_errors_exit_2_and_name_the_line(run_dir):
    bad = run_dir / "bad.toml"
    bad.write_text(RUN.replace("network_dim = 4", 'network_dim = "4"'))
    env = {**os.environ, "SDTRAIN_NO_REEXEC": "1", "COLUMNS": "400"}
    proc = subprocess.run(
        [sys.executable, "-m", "sdtrain", "train", "lora", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    line = RUN.splitlines().index("network_dim = 4") + 1
    assert f"bad.toml:{line}" in proc.stderr and "network.network_dim" in proc.stderr


def test_frozen_text_encoder_outputs_are_cached_for_static_captions(run_dir, cli, monkeypatch):
    import sdtrain.methods.conditioning as conditioning

    calls = []
    real = conditioning.TextConditioning.encode

    def counting(self, bundle, captions, grad):
        calls.append(len(captions))
        return real(self, bundle, captions, grad)

    monkeypatch.setattr(conditioning.TextConditioning, "encode", counting)
    result = cli(["train", "lora", str(run_dir / "run.toml"), "--network_train_unet_only"])
    assert result.exit_code == 0, result.output
    # 3 distinct static captions, each encoded once (one at a time), over 4 steps of batch 2
    assert calls == [1, 1, 1]


def test_latents_cached_during_the_load_train_the_same_lora(run_dir, cli, monkeypatch):
    """With cache_latents the VAE encodes while the model loads (models/load.py `with_vae`) and
    is released before the UNet exists; the LoRA is bit-identical to caching after the load."""
    import sdtrain.models.load as load

    real = load.load_bundle
    calls: list[bool] = []

    def spy(*args, with_vae=None, **kwargs):
        calls.append(with_vae is not None)
        return real(*args, with_vae=with_vae, **kwargs)

    monkeypatch.setattr(load, "load_bundle", spy)
    args = ["train", "lora", str(run_dir / "run.toml"), "--cache_latents"]
    result = cli(args)
    assert result.exit_code == 0, result.output
    (run_dir / "out").rename(run_dir / "first")

    def after_load(*args, with_vae=None, **kwargs):  # the order before: cache once loaded
        calls.append(with_vae is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "load_bundle", after_load)
    result = cli(args)
    assert result.exit_code == 0, result.output
    assert calls == [True, True]
    a = load_file(str(run_dir / "first" / "tiny.safetensors"))
    b = load_file(str(run_dir / "out" / "tiny.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_memory_levers_train_the_same_lora_and_states(run_dir, cli, monkeypatch):
    """An fp32 LoRA run on a half model file (toy-sd1 is float16) keeps the text encoder's token
    embedding half (models/half_embedding.py), recomputes the U-Net's GEGLU gate and the
    feed-forward output layer's saved input in backward (models/geglu.py) and keeps only fc1's
    output of the text encoder's MLPs (models/clip_mlp.py); all switched off, it trains the same
    adapters and writes the same resumable states, bit for bit."""
    import sdtrain.models.load as load
    from sdtrain.engine.halfweights import has_frozen_half
    from sdtrain.models.clip_mlp import OPT_OUT as MLP_OPT_OUT
    from sdtrain.models.geglu import OPT_OUT as GEGLU_OPT_OUT
    from sdtrain.models.half_embedding import OPT_OUT as EMBEDDING_OPT_OUT
    from sdtrain.models.half_embedding import HalfTokenEmbedding

    toml = run_dir / "run.toml"
    toml.write_text(
        RUN.replace("builtin:tiny-sd1", "builtin:toy-sd1").replace(
            "save_every_n_steps = 2", "save_every_n_steps = 2\nsave_state = true"
        )
    )
    real = load.load_bundle
    bundles = []

    def keep(*args, **kwargs):
        bundles.append(real(*args, **kwargs))
        return bundles[-1]

    monkeypatch.setattr(load, "load_bundle", keep)
    for name in ("on", "off"):
        if name == "off":
            monkeypatch.setenv(EMBEDDING_OPT_OUT, "fp32")
            monkeypatch.setenv(GEGLU_OPT_OUT, "stock")
            monkeypatch.setenv(MLP_OPT_OUT, "stock")
        result = cli(["train", "lora", str(toml)])
        assert result.exit_code == 0, result.output
        (run_dir / "out").rename(run_dir / name)
    on, off = bundles
    embedding = on.text_encoder.get_input_embeddings()
    assert isinstance(embedding, HalfTokenEmbedding) and embedding.weight.dtype == torch.float16
    assert type(off.text_encoder.get_input_embeddings()) is torch.nn.Embedding
    for bundle in (on, off):
        assert bundle.text_encoder.dtype == torch.float32
        assert not has_frozen_half([bundle.unet, bundle.text_encoder])
    geglus = [m for m in on.unet.modules() if type(m).__name__ == "GEGLU"]
    assert geglus and all("forward" in vars(m) for m in geglus)
    assert not any("forward" in vars(m) for m in off.unet.modules() if type(m).__name__ == "GEGLU")
    feed_forwards = [m for m in on.unet.modules() if type(m).__name__ == "FeedForward"]
    assert feed_forwards and all("forward" in vars(m) for m in feed_forwards)
    mlps = [m for m in on.text_encoder.modules() if type(m).__name__ == "CLIPMLP"]
    assert mlps and all("forward" in vars(m) for m in mlps)
    off_mlps = [m for m in off.text_encoder.modules() if type(m).__name__ == "CLIPMLP"]
    assert off_mlps and not any("forward" in vars(m) for m in off_mlps)
    # what else has its own forward there is the Linear layers' kernel choice (linear_path.py)
    patched = [m for m in off.text_encoder.modules() if "forward" in vars(m)]
    assert all(type(m) is torch.nn.Linear for m in patched)

    files = sorted(p.relative_to(run_dir / "on") for p in (run_dir / "on").rglob("*.safetensors"))
    assert files == sorted(
        p.relative_to(run_dir / "off") for p in (run_dir / "off").rglob("*.safetensors")
    )
    assert Path("tiny.safetensors") in files
    assert sum(p.name == "trainable.safetensors" for p in files) >= 2  # the resumable states
    for path in files:
        a, b = load_file(str(run_dir / "on" / path)), load_file(str(run_dir / "off" / path))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), path
    for state in (p.parent for p in files if p.name == "trainable.safetensors"):
        names = {p.name for p in (run_dir / "on" / state).iterdir()}
        assert names == {p.name for p in (run_dir / "off" / state).iterdir()}
        assert {"trainable.safetensors", "optimizer.safetensors"} <= names
        for component in ("trainable.safetensors", "optimizer.safetensors"):
            metadata = []
            for run in ("on", "off"):
                with safe_open(str(run_dir / run / state / component), "pt") as handle:
                    metadata.append(handle.metadata())
            assert metadata[0] == metadata[1], f"{state}/{component}"
    # the LoRA file's metadata too, apart from the run's own times and session id
    per_run = {
        "modelspec.date",
        "ss_session_id",
        "ss_training_started_at",
        "ss_training_finished_at",
    }
    metadata = []
    for run in ("on", "off"):
        with safe_open(str(run_dir / run / "tiny.safetensors"), "pt") as handle:
            metadata.append({k: v for k, v in handle.metadata().items() if k not in per_run})
    assert metadata[0] == metadata[1]
