"""LoraSpec: network_args parsing (strings or typed), rejections, block mode, rank choice."""

from __future__ import annotations

import math

import pytest

from sdtrain.config.methods import NetworkSection
from sdtrain.errors import ConfigError
from sdtrain.methods.adapters.blocks import block_index
from sdtrain.methods.adapters.spec import LoraSpec
from sdtrain.methods.adapters.targets import Target


def spec_of(**kwargs) -> LoraSpec:
    return LoraSpec.from_section(NetworkSection(**kwargs))


def target(name: str, kind: str = "linear", root: str = "unet") -> Target:
    return Target(root, name, name, kind, 8, 8)  # type: ignore[arg-type]


def test_defaults_follow_the_reference():
    spec = spec_of()
    assert (spec.dim, spec.alpha, spec.conv_dim, spec.blocks) == (4, 1.0, None, None)
    assert spec.apply_unet and spec.apply_text_encoder and not spec.with_conv
    assert spec.rank_for(target("lora_unet_x", "conv")) is None
    assert spec.rank_for(target("lora_unet_x", "conv1x1")) == (4, 1.0)


def test_string_and_typed_network_args_agree():
    strings = spec_of(
        network_dim=8, network_args=["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1"]
    )
    typed = spec_of(
        network_dim=8, network_args={"conv_dim": 4, "conv_alpha": 2, "rank_dropout": 0.1}
    )
    for spec in (strings, typed):
        assert (spec.conv_dim, spec.conv_alpha, spec.rank_dropout) == (4, 2.0, 0.1)
        assert spec.with_conv
        assert spec.rank_for(target("lora_unet_x", "conv")) == (4, 2.0)
        assert spec.rank_for(target("lora_unet_x")) == (8, 1.0)
    assert strings.args == {"conv_dim": "4", "conv_alpha": "2", "rank_dropout": "0.1"}


def test_conv_alpha_defaults_to_one_and_alpha_zero_means_rank():
    spec = spec_of(network_dim=16, network_alpha=0.0, network_args={"conv_dim": 8})
    assert spec.conv_alpha == 1.0
    assert spec.rank_for(target("lora_te_x", root="text_encoder")) == (16, 16.0)


def problems_of(**kwargs) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        spec_of(**kwargs)
    return {p.key: f"{p.message} | {p.hint}" for p in caught.value.problems}


def test_every_bad_argument_is_reported_at_once_with_its_key():
    found = problems_of(
        network_args=[
            "conv_dims=4",
            "dropout=0.1",
            "rank_dropout=1.5",
            "module_dropout=x",
            "oops",
            "conv_alpha=2",
        ]
    )
    assert "did you mean `conv_dim`" in found["network.network_args.conv_dims"]
    assert "network_dropout" in found["network.network_args.dropout"]
    assert "must be >= 0.0 and < 1.0" in found["network.network_args.rank_dropout"]
    assert "expected a number" in found["network.network_args.module_dropout"]
    assert "expected key=value" in found["network.network_args[4]"]
    assert "needs conv_dim" in found["network.network_args.conv_alpha"]


def test_wrong_types_are_rejected():
    found = problems_of(network_args={"conv_dim": 4.5, "loraplus_lr_ratio": True})
    assert "whole number" in found["network.network_args.conv_dim"]
    assert "expected a number" in found["network.network_args.loraplus_lr_ratio"]


def test_block_arguments_are_checked():
    found = problems_of(network_args={"block_dims": "1,2,3", "down_lr_weight": "wavy"})
    assert "needs 25 values" in found["network.network_args.block_dims"]
    assert "unknown LR-weight preset" in found["network.network_args.down_lr_weight"]
    found = problems_of(network_args={"block_alphas": ",".join(["1"] * 25)})
    assert "only used in block mode" in found["network.network_args.block_alphas"]


def test_block_index_matches_the_reference_numbering():
    assert block_index("lora_unet_down_blocks_0_attentions_0_proj_in") == 1
    assert block_index("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q") == 5
    assert block_index("lora_unet_down_blocks_0_downsamplers_0_conv") == 3
    assert block_index("lora_unet_mid_block_attentions_0_proj_out") == 12
    assert block_index("lora_unet_up_blocks_0_upsamplers_0_conv") == 15
    assert block_index("lora_unet_up_blocks_3_attentions_2_proj_out") == 24
    assert block_index("lora_te_text_model_encoder_layers_0_mlp_fc1") == -1


def test_block_dims_and_lr_weights():
    dims = ",".join(str(i) for i in range(25))
    spec = spec_of(
        network_dim=4,
        network_alpha=2.0,
        network_args={
            "block_dims": dims,
            "down_lr_weight": "sine+.5",
            "mid_lr_weight": "0",
            "up_lr_weight": [1.0, 0.25],
            "block_lr_zero_threshold": "0.3",
        },
    )
    blocks = spec.blocks
    assert blocks is not None and blocks.lr_weights is not None
    weights = blocks.lr_weights
    assert len(weights) == 25 and weights[0] == pytest.approx(0.5)
    assert weights[11] == pytest.approx(1.5) and weights[5] == pytest.approx(
        math.sin(math.pi * 5 / 22) + 0.5
    )
    assert weights[12] == 0.0  # mid weight 0
    assert weights[13:16] == (1.0, 0.0, 1.0)  # 0.25 <= threshold; missing values padded with 1.0
    assert blocks.alphas == (2.0,) * 25
    assert blocks.dims[12] == 0 and blocks.dims[14] == 0 and blocks.dims[3] == 3
    assert blocks.conv_dims is None
    assert spec.rank_for(target("lora_unet_down_blocks_0_attentions_1_proj_in")) == (2, 2.0)
    assert spec.rank_for(target("lora_unet_mid_block_attentions_0_proj_in")) is None
    assert spec.rank_for(target("lora_unet_down_blocks_0_resnets_0_conv1", "conv")) is None
    # the text encoder is not affected by block mode
    assert spec.rank_for(target("lora_te_text_model_x", root="text_encoder")) == (4, 2.0)


def test_block_mode_with_conv_dim_gives_every_block_conv_modules():
    spec = spec_of(network_args={"down_lr_weight": "zeros+1", "conv_dim": 2, "conv_alpha": 1})
    assert spec.blocks is not None and spec.blocks.conv_dims == (2,) * 25
    assert spec.rank_for(target("lora_unet_up_blocks_1_resnets_0_conv1", "conv")) == (2, 1.0)


def test_loraplus_ratios():
    spec = spec_of(network_args={"loraplus_lr_ratio": 16, "loraplus_unet_lr_ratio": "4"})
    assert spec.plus_ratio("unet") == 4.0 and spec.plus_ratio("text_encoder") == 16.0


def test_train_only_flags():
    assert not spec_of(network_train_unet_only=True).apply_text_encoder
    assert not spec_of(network_train_text_encoder_only=True).apply_unet


def test_module_ranks_decide_alone_and_conflict_with_dim_arguments():
    spec = spec_of().with_module_ranks({"lora_unet_a": (8, 3.0), "lora_unet_b": (2, 0.0)})
    assert spec.with_conv
    assert spec.rank_for(target("lora_unet_a", "conv")) == (8, 3.0)
    assert spec.rank_for(target("lora_unet_b")) == (2, 2.0)
    assert spec.rank_for(target("lora_unet_c")) is None
    with pytest.raises(ConfigError) as caught:
        spec_of(network_args={"conv_dim": 4}).with_module_ranks({})
    assert "dim_from_weights" in caught.value.problems[0].message
