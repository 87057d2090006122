"""The kohya LoRA file: key names, shapes, alpha, precision, reading back, ranks from a file."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import outputs, spec, tiny_text_encoder, tiny_unet, trained_network

from sdtrain.errors import ModelLoadError, TrainingError
from sdtrain.methods.adapters import kohya
from sdtrain.methods.adapters.apply import apply_lora_file, merge_lora_into
from sdtrain.methods.adapters.lora import LoraNetwork
from sdtrain.methods.adapters.targets import find_targets

TINY_TRANSFORMERS = 4  # down 0, mid, up 1 (x2) in the tiny U-Net


class Bundle:  # what apply/merge read: the family names the adapter roots
    def __init__(self, unet, text_encoder):
        from sdtrain.models.family import SDFamily

        self.unet, self.text_encoder = unet, text_encoder
        self.family = SDFamily("sd1", "epsilon", 64, 1.0, 32)


def test_lierla_keys_shapes_and_alpha():
    _, text_encoder, net = trained_network(network_dim=4, network_alpha=2.0)
    tensors = kohya.state_dict(net)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(names) == 2 * 6 + TINY_TRANSFORMERS * 12
    assert len(tensors) == 3 * len(names)
    te_q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    assert tensors[f"{te_q}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{te_q}.lora_up.weight"].shape == (32, 4)
    ff = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
    assert tensors[f"{ff}.lora_down.weight"].shape == (4, 256)
    assert tensors[f"{ff}.lora_up.weight"].shape == (64, 4)
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tensors[f"{proj}.lora_down.weight"].shape == (4, 32, 1, 1)
    assert tensors[f"{proj}.lora_up.weight"].shape == (32, 4, 1, 1)
    alpha = tensors[f"{proj}.alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == 2.0
    assert not any("resnets" in n for n in names)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    # names are exactly the targets' kohya names
    assert {n for n in names if n.startswith("lora_te")} == {
        t.name for t in find_targets(text_encoder, "text_encoder")
    }


def test_c3lier_conv_modules():
    _, _, net = trained_network(network_dim=4, network_args={"conv_dim": 2, "conv_alpha": 3})
    tensors = kohya.state_dict(net, "fp16")
    conv = "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 64, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (64, 2, 1, 1)
    assert tensors[f"{conv}.alpha"].item() == 3.0
    assert tensors[f"{conv}.alpha"].dtype == torch.float32  # alpha is never cast
    assert tensors[f"{conv}.lora_down.weight"].dtype == torch.float16
    shortcut = "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
    assert tensors[f"{shortcut}.lora_down.weight"].shape == (4, 32, 1, 1)  # network_dim
    emb = "lora_unet_mid_block_resnets_1_time_emb_proj"
    assert tensors[f"{emb}.lora_down.weight"].shape == (4, 128)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt"])
def test_round_trip_through_a_file(tmp_path, suffix):
    unet, text_encoder, net = trained_network(
        network_dim=4, network_alpha=2.0, network_args={"conv_dim": 2}
    )
    path = tmp_path / f"lora{suffix}"
    kohya.save(path, kohya.state_dict(net), {"ss_network_dim": "4"})
    tensors, metadata = kohya.read(path)
    assert set(tensors) == set(kohya.state_dict(net))
    if suffix == ".safetensors":
        assert metadata["ss_network_dim"] == "4" and "sshs_model_hash" in metadata
    # a fresh network with another alpha takes the file's alpha *and scale* (§13.3 fixed)
    unet2, te2 = tiny_unet(), tiny_text_encoder()
    other = LoraNetwork.create(
        unet2, te2, spec(network_dim=4, network_alpha=1.0, network_args={"conv_dim": 2})
    )
    report = kohya.load_into(other, tensors, path)
    assert not report.missing and not report.unexpected
    assert len(report.loaded) == len(net.modules)
    assert other.modules[0].layer.scaling["sdtrain"] == 0.5
    for got, want in zip(outputs(unet2, te2), outputs(unet, text_encoder), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_non_strict_load_reports_and_strict_load_refuses(tmp_path):
    _, _, net = trained_network(network_dim=4)
    tensors = kohya.state_dict(net)
    dropped = "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"
    del tensors[dropped]
    tensors["lora_unet_nowhere.lora_down.weight"] = torch.zeros(4, 4)
    other = LoraNetwork.create(tiny_unet(), tiny_text_encoder(), spec(network_dim=4))
    report = kohya.load_into(other, tensors, "x")
    assert report.missing == [dropped]
    assert report.unexpected == ["lora_unet_nowhere.lora_down.weight"]
    with pytest.raises(TrainingError):
        kohya.load_into(other, tensors, "x", strict=True)


def test_rank_mismatch_says_what_to_do():
    _, _, net = trained_network(network_dim=4)
    other = LoraNetwork.create(tiny_unet(), tiny_text_encoder(), spec(network_dim=8))
    with pytest.raises(ModelLoadError) as caught:
        kohya.load_into(other, kohya.state_dict(net), "f.safetensors")
    assert "dim_from_weights" in caught.value.hint


def test_dim_from_weights_rebuilds_the_file_network(tmp_path):
    unet, text_encoder, net = trained_network(
        network_dim=4, network_alpha=3.0, network_args={"conv_dim": 2, "conv_alpha": 1}
    )
    path = tmp_path / "lora.safetensors"
    kohya.save(path, kohya.state_dict(net), None)
    tensors, _ = kohya.read(path)
    ranks = kohya.file_ranks(tensors)
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == (2, 1.0)
    assert ranks["lora_te_text_model_encoder_layers_0_mlp_fc1"] == (4, 3.0)
    rebuilt_spec = spec(network_dim=16).with_module_ranks(ranks)
    unet2, te2 = tiny_unet(), tiny_text_encoder()
    rebuilt = LoraNetwork.create(unet2, te2, rebuilt_spec)
    assert {m.target.name: (m.rank, m.alpha) for m in rebuilt.modules} == ranks
    assert not kohya.load_into(rebuilt, tensors, path).unexpected
    for got, want in zip(outputs(unet2, te2), outputs(unet, text_encoder), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_old_files_without_alpha_use_alpha_equal_rank():
    _, _, net = trained_network(network_dim=4)
    tensors = {k: v for k, v in kohya.state_dict(net).items() if not k.endswith(".alpha")}
    assert set(kohya.file_ranks(tensors).values()) == {(4, 4.0)}


def test_bad_files_are_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError):
        kohya.read(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError):
        kohya.read(junk)
    torch.save({"x": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ModelLoadError):
        kohya.read(tmp_path / "odd.pt")


def test_merge_and_live_adapter_give_the_same_model(tmp_path):
    unet, text_encoder, net = trained_network(
        network_dim=4, network_alpha=2.0, network_args={"conv_dim": 2, "conv_alpha": 3}
    )
    path = tmp_path / "lora.safetensors"
    kohya.save(path, kohya.state_dict(net), None)
    for m in net.modules:  # the live model at weight 0.5
        m.set_alpha(m.alpha, multiplier=0.5)
    live = outputs(unet, text_encoder)
    merged = Bundle(tiny_unet(), tiny_text_encoder())
    report = merge_lora_into(merged, path, weight=0.5)
    assert len(report.loaded) == len(net.modules) and not report.unexpected
    applied = Bundle(tiny_unet(), tiny_text_encoder())
    apply_lora_file(applied, path, weight=0.5, adapter_name="a")
    assert not any(p.requires_grad for p in applied.unet.parameters())
    for bundle in (merged, applied):
        for got, want in zip(outputs(bundle.unet, bundle.text_encoder), live, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_two_files_stack(tmp_path):
    paths = []
    for seed in (1, 2):
        _, _, net = trained_network(seed=seed, network_dim=4)
        paths.append(tmp_path / f"l{seed}.safetensors")
        kohya.save(paths[-1], kohya.state_dict(net), None)
    merged, applied = (
        Bundle(tiny_unet(), tiny_text_encoder()),
        Bundle(tiny_unet(), tiny_text_encoder()),
    )
    for path, weight, name in ((paths[0], 1.0, "a"), (paths[1], -0.7, "b")):
        merge_lora_into(merged, path, weight)
        apply_lora_file(applied, path, weight, adapter_name=name)
    for got, want in zip(
        outputs(applied.unet, applied.text_encoder),
        outputs(merged.unet, merged.text_encoder),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
