"""ss_* / modelspec.* metadata of LoRA files and the sshs_* hashes (§7.6)."""

from __future__ import annotations

import hashlib
import json

import pytest

from sdtrain.config.methods import NetworkSection
from sdtrain.methods.adapters.metadata import (
    TrainingFacts,
    lora_metadata,
    training_metadata,
    with_hashes,
)
from sdtrain.methods.adapters.spec import LoraSpec
from sdtrain.models.bundle import FamilyInfo

SD1 = FamilyInfo(
    name="sd1", prediction_type="epsilon", resolution=512, latent_scale=0.18215, text_width=768
)
SD2V = FamilyInfo(
    name="sd2",
    prediction_type="v_prediction",
    resolution=768,
    latent_scale=0.18215,
    text_width=1024,
)
NOW = 1_760_000_000.0


def dataset(image_dir: str, is_reg: bool = False, repeats: int = 10, count: int = 5) -> dict:
    return {
        "is_dreambooth": True,
        "batch_size_per_device": 2,
        "num_train_images": count * repeats,
        "num_reg_images": 0,
        "resolution": [512, 512],
        "enable_bucket": True,
        "min_bucket_reso": 256,
        "max_bucket_reso": 1024,
        "bucket_no_upscale": False,
        "tag_frequency": {image_dir: {"cat": count}},
        "bucket_info": {
            "buckets": {"0": {"resolution": [512, 512], "count": 50}},
            "mean_img_ar_error": 0.0,
        },
        "subsets": [
            {
                "img_count": count,
                "num_repeats": repeats,
                "image_dir": image_dir,
                "is_reg": is_reg,
                "class_tokens": "sks cat",
                "flip_aug": True,
                "shuffle_caption": False,
                "keep_tokens": 1,
                "color_aug": False,
                "random_crop": False,
            }
        ],
    }


def facts(**changes) -> TrainingFacts:
    base = dict(
        family=SD1,
        session_id=1234,
        training_started_at=NOW - 60,
        output_name="mylora",
        clip_skip=2,
        learning_rate=1e-4,
        text_encoder_lr=None,
        unet_lr=1e-4,
        optimizer="torch.optim.adamw.AdamW(weight_decay=0.01)",
        lr_scheduler="cosine",
        max_train_steps=100,
        num_epochs=2,
        seed=42,
        num_train_images=50,
        resolution=(512, 512),
        noise_offset=0.05,
        resolved_config="[training]\nseed = 42\n",
        datasets=[dataset("img"), dataset("img"), dataset("reg", is_reg=True)],
    )
    base.update(changes)
    return TrainingFacts(**base)


def network(**kwargs) -> NetworkSection:
    return NetworkSection(**{"network_dim": 8, "network_alpha": 4.0, **kwargs})


def test_training_keys_are_strings_like_the_reference():
    md = training_metadata(facts(), steps=50, epoch=1, now=NOW)
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_session_id"] == "1234" and md["ss_steps"] == "50" and md["ss_epoch"] == "1"
    assert md["ss_training_finished_at"] == str(NOW)
    assert md["ss_v2"] == "False" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_text_encoder_lr"] == "None" and md["ss_learning_rate"] == "0.0001"
    assert md["ss_clip_skip"] == "2" and md["ss_seed"] == "42" and md["ss_noise_offset"] == "0.05"
    assert md["ss_optimizer"].startswith("torch.optim.adamw.AdamW(")
    assert md["ss_face_crop_aug_range"] == "None" and md["ss_output_name"] == "mylora"
    assert json.loads(md["ss_datasets"])[0]["subsets"][0]["image_dir"] == "img"
    # reg subsets are left out, repeated dirs get " (2)", tag counts are taken once per dir
    assert json.loads(md["ss_dataset_dirs"]) == {
        "img": {"n_repeats": 10, "img_count": 5},
        "img (2)": {"n_repeats": 10, "img_count": 5},
    }
    assert json.loads(md["ss_tag_frequency"]) == {"img": {"cat": 5}, "reg": {"cat": 5}}
    assert md["sdtrain_config"].startswith("[training]")


def test_legacy_folder_mode_keys():
    legacy = dataset("5_sks cat")
    legacy["subsets"].append(dataset("1_cat", is_reg=True)["subsets"][0] | {"image_dir": "1_cat"})
    md = training_metadata(
        facts(datasets=[legacy], from_blueprint=False, total_batch_size=2),
        steps=1,
        epoch=1,
        now=NOW,
    )
    assert "ss_datasets" not in md
    assert md["ss_resolution"] == "(512, 512)" and md["ss_flip_aug"] == "True"
    assert md["ss_batch_size_per_device"] == "2" and md["ss_keep_tokens"] == "1"
    assert json.loads(md["ss_dataset_dirs"]) == {"5_sks cat": {"n_repeats": 10, "img_count": 5}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_cat": {"n_repeats": 10, "img_count": 5}}
    assert json.loads(md["ss_bucket_info"])["buckets"]["0"]["count"] == 50


def test_lora_keys_and_modelspec():
    base = training_metadata(facts(), steps=50, epoch=1, now=NOW)
    spec = LoraSpec.from_section(network(network_args=["conv_dim=4"]))
    md = lora_metadata(
        base, network(network_args=["conv_dim=4"], training_comment="hi"), spec, now=NOW
    )
    assert md["ss_network_module"] == "networks.lora"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("8", "4.0")
    assert md["ss_network_dropout"] == "None" and md["ss_training_comment"] == "hi"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4"}
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.implementation"] == "diffusers"
    assert md["modelspec.title"] == "mylora"
    assert md["modelspec.resolution"] == "512x512" and md["modelspec.prediction_type"] == "epsilon"
    assert md["modelspec.encoder_layer"] == "2"
    assert md["modelspec.date"].startswith("2025-") and "T" in md["modelspec.date"]
    assert "modelspec.timestep_range" not in md


def test_v_model_defaults_and_title_fallback():
    base = training_metadata(
        facts(family=SD2V, output_name=None, resolution=None, clip_skip=None, min_timestep=100),
        steps=1,
        epoch=1,
        now=NOW,
    )
    md = lora_metadata(base, network(), LoraSpec.from_section(network()), now=NOW)
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["modelspec.resolution"] == "768x768" and md["modelspec.prediction_type"] == "v"
    assert md["modelspec.title"] == f"LoRA@{NOW}"
    assert md["modelspec.timestep_range"] == "100,1000"
    assert "modelspec.encoder_layer" not in md and "ss_network_args" not in md


def test_no_metadata_keeps_the_minimum():
    base = training_metadata(facts(), steps=50, epoch=1, now=NOW)
    section = network(no_metadata=True, network_args={"conv_dim": 4})
    md = lora_metadata(base, section, LoraSpec.from_section(section), now=NOW)
    ss_keys = {k for k in md if not k.startswith("modelspec.")}
    assert ss_keys == {
        "ss_v2",
        "ss_base_model_version",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
    }
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_dynamic_dims_from_weights():
    spec = LoraSpec.from_section(network()).with_module_ranks({"a": (4, 1.0), "b": (8, 1.0)})
    md = lora_metadata({}, network(), spec, SD2V, now=NOW)
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("Dynamic", "1.0")
    # without engine facts the family still gives the model keys and modelspec basics
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["modelspec.resolution"] == "768x768" and md["modelspec.title"] == f"LoRA@{NOW}"


def _data_section(blob: bytes) -> bytes:
    return blob[8 + int.from_bytes(blob[:8], "little") :]


@pytest.mark.parametrize("size", [64, 700_000])  # under and over the 1 MiB legacy offset
def test_sshs_hashes_match_an_independent_computation(tmp_path, size):
    import safetensors.torch
    import torch

    from sdtrain.methods.adapters import kohya

    tensors = {
        "lora_unet_a.lora_down.weight": torch.arange(size, dtype=torch.float32),
        "lora_unet_a.alpha": torch.tensor(4.0),
    }
    metadata = {
        "ss_network_dim": "4",
        "ss_session_id": "1",
        "modelspec.title": "x",
        "sdtrain_config": "long text that must not change the hash",
    }
    path = tmp_path / "lora.safetensors"
    kohya.save(path, tensors, metadata)
    written = path.read_bytes()
    stored = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), "pt") as handle:
        md = handle.metadata()
    assert md["modelspec.title"] == "x" and md["sdtrain_config"].startswith("long")
    # model hash: the tensor-data section, which the real file shares with the ss_-only one
    assert md["sshs_model_hash"] == hashlib.sha256(_data_section(written)).hexdigest()
    # legacy hash: 64 KiB at 1 MiB of a serialisation carrying only the ss_* metadata
    ss_only = safetensors.torch.save(
        stored, {k: v for k, v in md.items() if k.startswith("ss_") and not k.startswith("sshs")}
    )
    assert md["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    if size < 1000:
        assert md["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    # metadata outside ss_* does not change either hash
    again = with_hashes(tensors, {"ss_network_dim": "4", "ss_session_id": "1"})
    assert (again["sshs_model_hash"], again["sshs_legacy_hash"]) == (
        md["sshs_model_hash"],
        md["sshs_legacy_hash"],
    )
