"""LoraMethod: freezing, groups and LRs, conditioning, loss weights, max-norm, state, export."""

from __future__ import annotations

import pytest
import torch

from sdtrain.config.methods import NetworkSection
from sdtrain.config.sections import OptimizerSection
from sdtrain.errors import TrainingError
from sdtrain.methods.base import SavePoint, StepInfo
from sdtrain.methods.lora import LoraMethod


def method(network: dict | None = None, optimizer: dict | None = None, **kwargs) -> LoraMethod:
    return LoraMethod(
        NetworkSection(**(network or {"network_dim": 4})),
        OptimizerSection(**(optimizer or {"learning_rate": 1e-3})),
        **kwargs,
    )


def info(step: int = 0) -> StepInfo:
    return StepInfo(step, 1, torch.Generator().manual_seed(step))


class FakeBatch:
    def __init__(self, captions: list[str], is_reg: list[bool], network_multiplier: float = 1.0):
        self.captions = captions
        self.is_reg = torch.tensor(is_reg)
        self.network_multiplier = network_multiplier


def step(m: LoraMethod, bundle, groups) -> float:
    """One optimizer step on random latents; returns the loss."""
    opt = torch.optim.SGD([{"params": g.params, "lr": g.lr} for g in groups])
    cond = m.condition(bundle, FakeBatch(["a cat", "a dog"], [False, True]), info())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = bundle.family.predict(bundle.unet, x, torch.tensor([10, 700]), cond).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def test_only_lora_parameters_train_and_they_are_fp32(tiny_bundle):
    tiny_bundle.unet.to(torch.bfloat16)
    tiny_bundle.text_encoder.to(torch.bfloat16)
    m = method()
    groups = m.prepare(tiny_bundle)
    assert [(g.name, g.lr) for g in groups] == [("textencoder", 1e-3), ("unet", 1e-3)]
    for model in (tiny_bundle.unet, tiny_bundle.text_encoder):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    in_groups = {id(p) for g in groups for p in g.params}
    assert all(p.dtype == torch.float32 for g in groups for p in g.params)
    assert in_groups == {
        id(p)
        for model in (tiny_bundle.unet, tiny_bundle.text_encoder)
        for p in model.parameters()
        if p.requires_grad
    }
    assert m.train_text_encoder()


def test_a_step_changes_only_the_adapters(tiny_bundle):
    before = {k: v.clone() for k, v in tiny_bundle.unet.state_dict().items()}
    m = method(optimizer={"learning_rate": 1e-2})
    groups = m.prepare(tiny_bundle)
    step(m, tiny_bundle, groups)
    after = tiny_bundle.unet.state_dict()
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert not changed  # base weights (peft keeps their names under base_layer) untouched
    ups = [k for k in after if ".lora_B." in k]
    assert any(after[k].abs().sum() > 0 for k in ups)


def test_learning_rates_plus_groups_and_zero_lr(tiny_bundle):
    m = method(
        network={"network_dim": 4, "network_args": {"loraplus_lr_ratio": 16}},
        optimizer={"learning_rate": 1e-4, "unet_lr": 2e-4, "text_encoder_lr": 0.0},
    )
    groups = m.prepare(tiny_bundle)
    assert [(g.name, g.lr) for g in groups] == [("unet", 2e-4), ("unet plus", 2e-4 * 16)]
    plus = {id(p) for p in groups[1].params}
    ups = {id(mod.up.weight) for mod in m.network.of("unet")}
    assert plus == ups
    assert not m.train_text_encoder()
    assert len(m.network.of("text_encoder")) == 12  # not trained, still saved
    assert not any(p.requires_grad for p in tiny_bundle.text_encoder.parameters())
    cond = m.condition(tiny_bundle, FakeBatch(["a cat"], [False]), info()).hidden_states
    assert cond.grad_fn is None and cond.shape == (1, 77, 32)


def test_unet_only_has_no_text_encoder_modules(tiny_bundle):
    m = method(network={"network_dim": 4, "network_train_unet_only": True})
    groups = m.prepare(tiny_bundle)
    assert [g.name for g in groups] == ["unet"]
    assert not m.network.of("text_encoder")


def test_block_lr_groups(tiny_bundle):
    m = method(
        network={
            "network_dim": 4,
            "network_args": {"up_lr_weight": "zeros+.5", "mid_lr_weight": "2"},
        },
        optimizer={"learning_rate": 1e-3},
    )
    groups = {g.name: g.lr for g in m.prepare(tiny_bundle)}
    assert groups == {
        "textencoder": 1e-3,
        "unet_block1": 1e-3,
        "unet_block12": 2e-3,
        "unet_block16": 5e-4,
        "unet_block17": 5e-4,
    }


def test_condition_is_the_text_encoder_output(tiny_bundle):
    ids = tiny_bundle.tokenizer(
        ["a cat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        want = tiny_bundle.text_encoder(ids).last_hidden_state
    m = method()
    m.prepare(tiny_bundle)
    got = m.condition(tiny_bundle, FakeBatch(["a cat"], [False]), info()).hidden_states
    torch.testing.assert_close(got, want)  # LoRA up weights start at zero
    assert got.requires_grad  # the text-encoder LoRA is trained


def test_loss_weights():
    assert method().loss_weights(FakeBatch(["a", "b"], [False, True])) is None
    weights = method(prior_loss_weight=0.25).loss_weights(FakeBatch(["a", "b"], [False, True]))
    assert weights.tolist() == [1.0, 0.25]


def test_max_norm(tiny_bundle):
    m = method(network={"network_dim": 4, "network_alpha": 4.0, "scale_weight_norms": 1.0})
    m.prepare(tiny_bundle)
    with torch.no_grad():
        for i, mod in enumerate(m.network.modules):
            mod.up.weight.fill_(1.0 if i % 2 else 1e-4)
    metrics = m.after_step(tiny_bundle, info(1))
    assert set(metrics) == {
        "max_norm/keys_scaled",
        "max_norm/average_key_norm",
        "max_norm/max_key_norm",
    }
    assert metrics["max_norm/keys_scaled"] == len(m.network.modules) // 2
    assert metrics["max_norm/max_key_norm"] == pytest.approx(1.0, rel=1e-5)
    from sdtrain.methods.adapters.lora import delta_weight

    for mod in m.network.modules:
        assert delta_weight(mod.down.weight, mod.up.weight).norm() <= 1.0 + 1e-5
    assert method().after_step(tiny_bundle, info(1)) == {}


def test_trainable_state_round_trip(tiny_bundle):
    m = method(optimizer={"learning_rate": 1e-2})
    groups = m.prepare(tiny_bundle)
    step(m, tiny_bundle, groups)
    state = {k: v.clone() for k, v in m.trainable_state().items()}
    params_before = [id(p) for g in groups for p in g.params]
    step(m, tiny_bundle, groups)
    assert not all(torch.equal(state[k], v) for k, v in m.trainable_state().items())
    m.load_trainable_state(state)
    assert all(torch.equal(state[k], v) for k, v in m.trainable_state().items())
    assert params_before == [id(p) for g in groups for p in g.params]
    with pytest.raises(TrainingError):
        m.load_trainable_state({k: v for k, v in state.items() if "mid_block" not in k})


def test_export_writes_kohya_and_diffusers_files(tiny_bundle, tmp_path):
    from safetensors import safe_open

    m = method(network={"network_dim": 4, "save_diffusers_lora": True}, save_precision="fp16")
    m.prepare(tiny_bundle)
    out = tmp_path / "out"
    point = SavePoint(
        out, "mylora-000001", 1, 10, False, {"ss_steps": "10", "modelspec.title": "t"}
    )
    paths = m.export(tiny_bundle, point)
    assert [p.name for p in paths] == [
        "mylora-000001.safetensors",
        "mylora-000001.diffusers.safetensors",
    ]
    with safe_open(str(paths[0]), "pt") as handle:
        md = handle.metadata()
        assert (
            handle.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight").dtype
            == torch.float16
        )
    assert md["ss_steps"] == "10" and md["ss_network_dim"] == "4" and "sshs_model_hash" in md
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.title"] == "t"
    with safe_open(str(paths[1]), "pt") as handle:
        assert "lora_adapter_metadata" in handle.metadata()
        assert any(k.startswith("text_encoder.text_model.") for k in handle.keys())  # noqa: SIM118
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)


def test_export_as_pt(tiny_bundle, tmp_path):
    m = method(network={"network_dim": 4, "save_model_as": "pt"})
    m.prepare(tiny_bundle)
    (path,) = m.export(tiny_bundle, SavePoint(tmp_path, "last", 1, 1, True))
    assert path.name == "last.pt"
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == m.trainable_state().keys()


def test_dropouts_act_in_training_only(tiny_bundle):
    m = method(
        network={"network_dim": 4, "network_dropout": 0.5, "network_args": {"rank_dropout": 0.5}}
    )
    m.prepare(tiny_bundle)
    with torch.no_grad():
        for mod in m.network.modules:
            mod.up.weight.normal_()
    ids = torch.randint(0, 500, (1, 77))
    te = tiny_bundle.text_encoder
    with torch.no_grad():
        first, second = te(ids).last_hidden_state, te(ids).last_hidden_state
        assert not torch.equal(first, second)
        with m.sampling(tiny_bundle):
            quiet = [te(ids).last_hidden_state for _ in range(2)]
        assert torch.equal(*quiet)
    assert m.network.is_training()


def test_module_dropout_skips_the_branch(tiny_bundle):
    m = method(network={"network_dim": 4, "network_args": {"module_dropout": 0.999999}})
    groups = m.prepare(tiny_bundle)
    ids = torch.randint(0, 500, (1, 77))
    base = tiny_bundle.text_encoder(ids).last_hidden_state.detach()
    with torch.no_grad():
        for mod in m.network.modules:
            mod.up.weight.normal_()
    out = tiny_bundle.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(out, base)
    assert out.grad_fn is None  # nothing of the LoRA was computed
    assert all(not mod.layer.disable_adapters for mod in m.network.modules)
    with m.sampling(tiny_bundle):
        assert not torch.allclose(tiny_bundle.text_encoder(ids).last_hidden_state, base)
    assert groups


def test_network_weights_and_dim_from_weights(tmp_path):
    import sys
    from pathlib import Path

    from sdtrain.methods.adapters import kohya

    sys.path.insert(0, str(Path(__file__).parent / "adapters"))
    from lora_helpers import trained_network

    _, _, net = trained_network(network_dim=8, network_alpha=2.0, network_args={"conv_dim": 2})
    path = tmp_path / "start.safetensors"
    kohya.save(path, kohya.state_dict(net), None)
    want = kohya.state_dict(net)
    from tiny_parts import tiny_text_encoder, tiny_unet

    from sdtrain.models.family import SDFamily

    sd1 = SDFamily("sd1", "epsilon", 64, 1.0, 32)

    class Bundle:
        unet, text_encoder, family = tiny_unet(), tiny_text_encoder(), sd1

    m = method(network={"network_weights": str(path), "dim_from_weights": True})
    m.prepare(Bundle)
    got = m.trainable_state()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    # same ranks without dim_from_weights: loaded into the configured network
    class Again:
        unet, text_encoder, family = tiny_unet(), tiny_text_encoder(), sd1

    m = method(
        network={
            "network_dim": 8,
            "network_alpha": 1.0,
            "network_weights": str(path),
            "network_args": {"conv_dim": 2},
        }
    )
    m.prepare(Again)
    assert all(torch.equal(m.trainable_state()[k], want[k]) for k in want)


def test_network_multiplier_scales_the_lora_output_per_batch(tiny_bundle):
    """A dataset's network_multiplier scales the adapter's delta for its batches; sampling
    uses weight 1; what is saved (alpha) never changes."""
    m = method()
    groups = m.prepare(tiny_bundle)
    for group in groups:  # make the LoRA do something (up weights start at zero)
        for p in group.params:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])

    def unet_out(multiplier: float) -> torch.Tensor:
        with torch.no_grad():
            cond = m.condition(tiny_bundle, FakeBatch(["a cat"], [False], multiplier), info())
            return tiny_bundle.unet(x, t, cond.hidden_states).sample

    alphas = [mod.alpha for mod in m.network.modules]
    base, one, two = unet_out(0.0), unet_out(1.0), unet_out(2.0)
    assert not torch.allclose(base, one)
    # text-encoder and U-Net deltas both scale, so the output is not exactly linear in the
    # multiplier; the direction and growth are what matter
    assert (two - base).norm() > 1.5 * (one - base).norm()
    assert [mod.alpha for mod in m.network.modules] == alphas
    with m.sampling(tiny_bundle):
        assert m.network.multiplier == 1.0
    assert m.network.multiplier == 2.0
