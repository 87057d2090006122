"""`sdtrain model info` on files that are not base models says what they are."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from sdtrain.models.embeddings import write_embedding
from sdtrain.models.info import inspect_model


def test_lora_file(tmp_path, cli):
    tensors = {}
    for name, width in (
        ("lora_unet_down_blocks_0_attentions_0_proj_in", 32),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768),
    ):
        tensors[f"{name}.lora_down.weight"] = torch.zeros(4, width)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(width, 4)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), {"ss_network_dim": "4", "ss_network_alpha": "2.0"})
    info = inspect_model(str(path), hashes=False)
    assert info.kind == "LoRA (kohya format)" and info.family == "sd1"
    assert info.describes["modules"] == "2 (1 U-Net, 1 text encoder)"
    assert info.describes["rank"] == "4 (2 modules)" and info.describes["network_alpha"] == "2.0"
    assert info.parameters["total"] > 0 and info.other_tensors == 0
    result = cli(["model", "info", str(path), "--no-hash"])
    text = " ".join(result.output.split())
    assert "LoRA (kohya format)" in text and "family unknown" not in text


def test_embedding_file(tmp_path):
    path = write_embedding(tmp_path / "emb.safetensors", torch.randn(3, 1024), token="shs")
    info = inspect_model(str(path), hashes=False)
    assert info.kind == "Textual Inversion embedding" and info.family == "sd2"
    assert info.describes["vectors"] == 3


def test_state_folder(tmp_path):
    folder = tmp_path / "run-step00000004-state"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"files": {}, "created": 0}))
    (folder / "train_state.json").write_text(json.dumps({"global_step": 4, "epoch": 2}))
    info = inspect_model(str(folder), hashes=False)
    assert info.kind == "training state (resumable)"
    assert info.describes["global_step"] == 4 and info.describes["epoch"] == 2
    assert info.describes["complete"].startswith("yes")
