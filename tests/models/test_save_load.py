"""Round trips between diffusers folders, LDM single files and our loader; diffusers interop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtrain.errors import ModelLoadError
from sdtrain.models.families import config_dir
from sdtrain.models.save import save_diffusers, save_single_file


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_folder_to_single_file_round_trip(tiny_files, load_spec, same_weights, family, fmt):
    from_folder = load_spec(str(tiny_files[family]["diffusers"]))
    from_file = load_spec(str(tiny_files[family][fmt]))
    same_weights(from_folder, from_file)
    assert from_file.family == from_folder.family
    assert from_file.family.name == family
    assert from_file.source.kind == "single_file"


def test_builtin_to_folder_round_trip(tiny_sd2, tiny_files, load_spec, same_weights):
    loaded = load_spec(str(tiny_files["sd2"]["diffusers"]))
    same_weights(tiny_sd2, loaded)
    assert loaded.family.prediction_type == "v_prediction"  # from scheduler/scheduler_config.json
    assert loaded.tokenizer.pad_token == "!"


def test_diffusers_folder_layout(tiny_files):
    folder = tiny_files["sd1"]["diffusers"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    keys = load_file(folder / "text_encoder" / "model.safetensors").keys()
    # prefix kept for older transformers and other tools
    assert all(key.startswith("text_model.") for key in keys)
    assert (folder / "tokenizer" / "tokenizer_config.json").is_file()
    assert not list(folder.parent.glob(".*.tmp"))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_from_single_file_reads_our_files(tiny_files, load_spec, same_weights, family):
    from diffusers import StableDiffusionPipeline

    ours = load_spec(str(tiny_files[family]["diffusers"]))
    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_files[family]["safetensors"]),
        config=str(config_dir(f"tiny-{family}")),
        local_files_only=True,
        tokenizer=ours.tokenizer,
        safety_checker=None,
        requires_safety_checker=False,
    )
    same_weights(ours, pipe)


def test_single_file_contents(tiny_files):
    path = tiny_files["sd2"]["safetensors"]
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
        layers = [k for k in keys if k.startswith("cond_stage_model.model.transformer.resblocks.")]
        projection = handle.get_tensor("cond_stage_model.model.text_projection")
        assert handle.get_tensor("cond_stage_model.model.logit_scale").shape == ()
        extra = handle.get_tensor("cond_stage_model.model.transformer.resblocks.2.mlp.c_fc.weight")
        last = handle.get_tensor("cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.title"] == "tiny-sd2"
    # tiny text encoder: 2 layers + the synthesised OpenCLIP extra layer (copy of the last)
    assert {k.split(".")[4] for k in layers} == {"0", "1", "2"}
    assert torch.equal(extra, last)
    assert torch.equal(projection, torch.ones(32, 32))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    ckpt = torch.load(tiny_files["sd1"]["ckpt"], weights_only=True)
    assert set(ckpt) == {"state_dict", "epoch", "global_step"}
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in ckpt["state_dict"]


def test_metadata_config_and_precision(tiny_sd1, tmp_path):
    path = save_single_file(
        tiny_sd1,
        tmp_path / "m.safetensors",
        precision="fp16",
        metadata={"modelspec.title": "mine", "ss_note": "x"},
        config_text="[model]\nclip_skip = 2\n",
        clip_skip=2,
    )
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        weight = handle.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert meta["modelspec.title"] == "mine" and meta["ss_note"] == "x"
    assert meta["sdtrain_config"] == "[model]\nclip_skip = 2\n"
    assert meta["modelspec.encoder_layer"] == "2"
    assert weight.dtype == torch.float16
    assert torch.equal(weight, tiny_sd1.unet.conv_in.weight.detach().half())
    assert tiny_sd1.unet.conv_in.weight.dtype == torch.float32  # the live model is untouched


def test_no_overwrite_without_flag(tiny_sd1, tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"user data")
    with pytest.raises(ModelLoadError, match="already exists"):
        save_single_file(tiny_sd1, target)
    assert target.read_bytes() == b"user data"
    save_single_file(tiny_sd1, target, overwrite=True)
    assert target.stat().st_size > 1000
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="already exists"):
        save_diffusers(tiny_sd1, folder)
    save_diffusers(tiny_sd1, folder, overwrite=True, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()


def test_bin_folder_loads(tiny_sd1, tmp_path, load_spec, same_weights):
    folder = save_diffusers(tiny_sd1, tmp_path / "bin", safe_serialization=False)
    same_weights(tiny_sd1, load_spec(str(folder)))


def test_sd2_extras_carried_from_the_source(tiny_files, tmp_path, load_spec):
    state = load_file(tiny_files["sd2"]["safetensors"])
    custom = torch.arange(32 * 32, dtype=torch.float32).reshape(32, 32)
    state["cond_stage_model.model.text_projection"] = custom
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    source = tmp_path / "source.safetensors"
    save_file(state, str(source), metadata={"modelspec.prediction_type": "v"})
    bundle = load_spec(str(source))
    out = save_single_file(bundle, tmp_path / "out.safetensors")
    written = load_file(out)
    assert torch.equal(written["cond_stage_model.model.text_projection"], custom)
    assert written["cond_stage_model.model.logit_scale"].item() == pytest.approx(4.6)


def test_ema_and_extra_keys_are_ignored(tiny_files, tmp_path, load_spec, same_weights):
    state = load_file(tiny_files["sd1"]["safetensors"])
    for key in list(state)[:150]:
        state["model_ema." + key.replace(".", "")] = state[key].clone() + 1
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[
        None
    ]
    state["some.other.key"] = torch.zeros(3)
    path = tmp_path / "ema.safetensors"
    save_file(state, str(path))
    same_weights(load_spec(str(tiny_files["sd1"]["safetensors"])), load_spec(str(path)))


def test_old_clip_names_without_text_model(tiny_files, tmp_path, load_spec, same_weights):
    state = load_file(tiny_files["sd1"]["safetensors"])
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    same_weights(load_spec(str(tiny_files["sd1"]["safetensors"])), load_spec(str(path)))


def test_missing_keys_are_named(tiny_files, tmp_path, load_spec):
    state = load_file(tiny_files["sd1"]["safetensors"])
    del state["model.diffusion_model.out.2.weight"]
    del state["first_stage_model.decoder.norm_out.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError) as info:
        load_spec(str(path))
    assert "model.diffusion_model.out.2.weight" in info.value.message
    assert "first_stage_model.decoder.norm_out.bias" in info.value.message
    assert str(path) in info.value.message


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_truncated_file_is_named(tiny_files, tmp_path, load_spec, fmt):
    data = tiny_files["sd1"][fmt].read_bytes()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        load_spec(str(path))
    assert str(path) in info.value.message
    assert "truncated" in info.value.message


def test_unsafe_ckpt_is_refused(tmp_path, load_spec):
    import os

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(ModelLoadError) as info:
        load_spec(str(path))
    assert str(path) in info.value.message and "pickle" in info.value.message
    assert ".safetensors" in info.value.hint


def test_not_a_checkpoint(tmp_path, load_spec):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="not a full SD checkpoint"):
        load_spec(str(path))
    with pytest.raises(ModelLoadError, match="not found"):
        load_spec(str(tmp_path / "nope.safetensors"))


def test_training_saves_keep_the_source_files_extra_keys(tiny_files, tmp_path, load_spec):
    """As the reference: a model trained from a single file is written over the source's own
    state dict, so EMA copies and other extras survive (unchanged, in their own dtype); the
    .ckpt counters are added to the source's."""
    state = load_file(tiny_files["sd1"]["safetensors"])
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    source = tmp_path / "source.ckpt"
    torch.save({"state_dict": state, "epoch": 2, "global_step": 100}, source)
    bundle = load_spec(str(source))
    kept = save_single_file(bundle, tmp_path / "kept.ckpt", keep_source_keys=True, global_step=5)
    plain = save_single_file(bundle, tmp_path / "plain.safetensors", precision="fp16")
    written = torch.load(kept, weights_only=True)
    assert written["global_step"] == 105 and written["epoch"] == 2
    assert torch.equal(written["state_dict"]["model_ema.decay"], torch.tensor(0.9999))
    assert written["state_dict"]["model_ema.num_updates"].dtype == torch.int32
    assert set(written["state_dict"]) == set(state)
    assert "model_ema.decay" not in load_file(plain)
