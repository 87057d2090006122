"""load_bundle: family / prediction detection, flags, VAE override, attention, hub cache, dtypes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtrain.config.sections import ModelSection
from sdtrain.errors import ConfigError, MissingExtraError, ModelLoadError
from sdtrain.models.load import load_bundle, source_kind
from sdtrain.models.save import save_diffusers


def test_v2_flag_contradicting_the_weights(tiny_files, load_spec):
    with pytest.raises(ModelLoadError, match="v2 = true"):
        load_spec(str(tiny_files["sd1"]["safetensors"]), v2=True)
    with pytest.raises(ModelLoadError, match="v2 = false"):
        load_spec(str(tiny_files["sd2"]["diffusers"]), v2=False)
    with pytest.raises(ModelLoadError, match="SD 1.x"):
        load_spec("builtin:tiny-sd1", v2=True)
    assert load_spec(str(tiny_files["sd2"]["ckpt"]), v2=True).family.name == "sd2"


def _without_metadata(src, dst):
    save_file(load_file(src), str(dst))
    return dst


def test_prediction_type_sources(tiny_files, tmp_path, load_spec):
    sd2 = tiny_files["sd2"]["safetensors"]
    assert load_spec(str(sd2)).family.prediction_type == "v_prediction"  # metadata says v
    # the flag wins over metadata
    assert load_spec(str(sd2), v_parameterization=False).family.prediction_type == "epsilon"
    bare = _without_metadata(sd2, tmp_path / "v2-1_512-ema-pruned.safetensors")
    assert load_spec(str(bare)).family.prediction_type == "epsilon"  # 512 in the name
    bare768 = _without_metadata(sd2, tmp_path / "v2-1_768-ema-pruned.safetensors")
    assert load_spec(str(bare768)).family.prediction_type == "v_prediction"
    plain = _without_metadata(sd2, tmp_path / "model.safetensors")
    assert load_spec(str(plain)).family.prediction_type == "v_prediction"  # SD2 default (768-v)
    state = torch.load(tiny_files["sd2"]["ckpt"], weights_only=True)
    state["global_step"] = 875000  # what SD 2.x-base checkpoints record
    base = tmp_path / "model.ckpt"
    torch.save(state, base)
    assert load_spec(str(base)).family.prediction_type == "epsilon"
    sd1 = _without_metadata(tiny_files["sd1"]["safetensors"], tmp_path / "768.safetensors")
    assert load_spec(str(sd1)).family.prediction_type == "epsilon"
    assert load_spec(str(sd1), v_parameterization=True).family.is_v


def test_folder_prediction_from_scheduler_and_flag(tiny_files, load_spec):
    folder = str(tiny_files["sd1"]["diffusers"])
    assert load_spec(folder).family.prediction_type == "epsilon"
    loaded = load_spec(folder, v_parameterization=True)
    assert loaded.family.prediction_type == "v_prediction"
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"


def test_device_dtype_and_no_half_vae():
    section = ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1", no_half_vae=True)
    bundle = load_bundle(section, dtype=torch.bfloat16)
    assert bundle.unet.dtype == torch.bfloat16
    assert bundle.text_encoder.dtype == torch.bfloat16
    assert bundle.vae.dtype == torch.float32
    half = load_bundle(
        ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1"), dtype=torch.bfloat16
    )
    assert half.vae.dtype == torch.bfloat16


def _vae_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vae_override_sources(tiny_sd1, tiny_files, tmp_path, load_spec):
    # a VAE that differs from the base model's
    donor = load_spec("builtin:tiny-sd1")
    with torch.no_grad():
        for parameter in donor.vae.parameters():
            parameter.add_(0.5)
    full = tmp_path / "donor.safetensors"
    from sdtrain.models.save import save_single_file

    save_single_file(donor, full)
    state = load_file(full)
    bare = {
        k.removeprefix("first_stage_model."): v
        for k, v in state.items()
        if k.startswith("first_stage_model.")
    }
    save_file(bare, str(tmp_path / "vae-ldm.safetensors"))
    save_file(donor.vae.state_dict(), str(tmp_path / "vae-diffusers.safetensors"))
    torch.save(donor.vae.state_dict(), tmp_path / "vae.bin")
    folder = save_diffusers(donor, tmp_path / "donor-folder")
    donor.vae.save_pretrained(str(tmp_path / "vae-only"))
    sources = [
        full,
        tmp_path / "vae-ldm.safetensors",
        tmp_path / "vae-diffusers.safetensors",
        tmp_path / "vae.bin",
        folder,
        tmp_path / "vae-only",
    ]
    base = str(tiny_files["sd1"]["safetensors"])
    for source in sources:
        bundle = load_spec(base, vae=str(source))
        assert _vae_equal(bundle.vae, donor.vae), source
        assert bundle.source.vae_spec == str(source)
        assert _vae_equal(bundle.unet, tiny_sd1.unet)


def test_vae_override_errors(tiny_files, tmp_path, load_spec):
    base = str(tiny_files["sd1"]["safetensors"])
    not_vae = tmp_path / "x.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(not_vae))
    with pytest.raises(ModelLoadError, match="no VAE weights"):
        load_spec(base, vae=str(not_vae))
    state = load_file(tiny_files["sd1"]["safetensors"])
    del state["first_stage_model.encoder.conv_in.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(ModelLoadError, match="encoder.conv_in.weight"):
        load_spec(base, vae=str(broken))


def test_attention_modes():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdtrain.models.attention import MemoryEfficientSDPAProcessor

    bundle = load_bundle(ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1"))
    processors = set(map(type, bundle.unet.attn_processors.values()))
    assert processors == {AttnProcessor2_0}
    eff = load_bundle(
        ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1", attention="mem_eff_attn")
    )
    assert set(map(type, eff.unet.attn_processors.values())) == {MemoryEfficientSDPAProcessor}
    assert set(map(type, eff.vae.attn_processors.values())) == {MemoryEfficientSDPAProcessor}
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    cond = torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            eff.unet(latents, t, cond).sample,
            bundle.unet(latents, t, cond).sample,
            rtol=1e-4,
            atol=1e-5,
        )


def test_xformers_needs_the_extra_and_cuda():
    import importlib.util

    section = ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1", xformers=True)
    expected = ConfigError if importlib.util.find_spec("xformers") else MissingExtraError
    with pytest.raises(expected) as info:
        load_bundle(section)
    if expected is MissingExtraError:
        assert info.value.extra == "xformers"
        assert "sdtrain[xformers]" in info.value.hint


def test_hub_id_from_the_local_cache(tiny_files, tmp_path, monkeypatch, load_spec, same_weights):
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-model"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_files["sd1"]["diffusers"], snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert source_kind("someone/tiny-model") == "hub"
    bundle = load_spec("someone/tiny-model")
    same_weights(bundle, load_spec(str(tiny_files["sd1"]["diffusers"])))
    assert bundle.source.kind == "hub"


def test_uncached_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="offline"):
        load_bundle(ModelSection(pretrained_model_name_or_path="nobody/not-cached"))


def test_missing_base_model():
    with pytest.raises(ConfigError):
        load_bundle(ModelSection())


def test_incomplete_folder_is_refused(tiny_files, tmp_path, load_spec):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_files["sd1"]["diffusers"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("conv_out.weight")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="conv_out.weight"):
        load_spec(str(folder))
    other = tmp_path / "other"
    shutil.copytree(tiny_files["sd1"]["diffusers"], other)
    shutil.rmtree(other / "vae")
    with pytest.raises(ModelLoadError, match="vae/config.json"):
        load_spec(str(other))


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers"])
def test_file_loaded_in_the_requested_dtype(tiny_files, tiny_sd1, fmt):
    section = ModelSection(
        pretrained_model_name_or_path=str(tiny_files["sd1"][fmt]), no_half_vae=True
    )
    bundle = load_bundle(section, dtype=torch.float16)
    assert bundle.unet.dtype == torch.float16 and bundle.text_encoder.dtype == torch.float16
    assert bundle.vae.dtype == torch.float32
    assert torch.equal(bundle.unet.conv_in.weight, tiny_sd1.unet.conv_in.weight.half())


@pytest.mark.parametrize("kind", ["diffusers", "safetensors"])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_parts_loaded_in_their_training_dtype_equal_the_cast_after_load(
    tiny_files, tmp_path, kind, file_dtype
):
    """part_dtypes: a frozen part loaded straight in bf16 holds exactly what loading it in fp32
    and casting it (what the engine does) gives, for fp32 and fp16 files."""
    from sdtrain.models.save import save_single_file

    spec = tiny_files["sd1"][kind]
    if file_dtype == torch.float16:
        base = load_bundle(ModelSection(pretrained_model_name_or_path=str(spec)))
        if kind == "diffusers":
            spec = save_diffusers(base, tmp_path / "half", precision="fp16")
        else:
            spec = save_single_file(base, tmp_path / "half.safetensors", precision="fp16")
    section = ModelSection(pretrained_model_name_or_path=str(spec))
    wide = load_bundle(section)
    bf16 = torch.bfloat16
    direct = load_bundle(section, part_dtypes={"unet": bf16, "vae": bf16})
    for name in ("unet", "vae"):
        a, b = getattr(wide, name).state_dict(), getattr(direct, name).state_dict()
        for key, value in a.items():
            want = value.to(bf16) if value.is_floating_point() else value
            assert b[key].dtype == want.dtype and torch.equal(b[key], want), f"{name}.{key}"
    assert all(p.dtype == torch.float32 for p in direct.text_encoder.parameters())


@pytest.mark.parametrize("kind", ["diffusers", "safetensors", "builtin", "override"])
def test_with_vae_sees_the_ready_vae_before_the_unet_and_text_encoder_load(
    tiny_files, tiny_sd1, tmp_path, kind
):
    """with_vae is called once, with the bundle's own VAE already cast, moved and (with `vae`)
    replaced, while no UNet or text encoder holds weights yet (modules built on the meta device
    to read a layout hold none)."""
    import gc

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    parts = (UNet2DConditionModel, CLIPTextModel)
    before = {id(o) for o in gc.get_objects() if isinstance(o, parts)}

    def loaded() -> list[str]:
        return [
            type(o).__name__
            for o in gc.get_objects()
            if isinstance(o, parts)
            and id(o) not in before
            and any(not p.is_meta for p in o.parameters())
        ]

    spec = "builtin:tiny-sd1" if kind == "builtin" else str(tiny_files["sd1"]["safetensors"])
    if kind == "diffusers":
        spec = str(tiny_files["sd1"]["diffusers"])
    keys = {"no_half_vae": True}
    if kind == "override":
        keys["vae"] = str(save_diffusers(tiny_sd1, tmp_path / "donor"))
    seen = []

    def with_vae(vae):
        seen.append((vae, vae.dtype, loaded()))

    section = ModelSection(pretrained_model_name_or_path=spec, **keys)
    bundle = load_bundle(section, dtype=torch.bfloat16, with_vae=with_vae)
    assert len(seen) == 1
    vae, dtype, loaded_then = seen[0]
    assert vae is bundle.vae and dtype == torch.float32  # no_half_vae: cast before the call
    if kind != "builtin":  # a random toy is built whole, then the VAE is handed over
        assert loaded_then == []
    assert sorted(loaded()) == ["CLIPTextModel", "UNet2DConditionModel"]
    assert bundle.unet.dtype == torch.bfloat16
    assert _vae_equal(bundle.vae, tiny_sd1.vae)
    if kind == "override":
        assert bundle.source.vae_spec == keys["vae"]
