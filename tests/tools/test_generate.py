"""`sdtrain generate`: CLI outputs, determinism, LoRA weights/layouts, embeddings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.config.prompt_file import PromptSpec
from sdtrain.errors import ConfigError
from sdtrain.models.png import read_parameters
from sdtrain.tools.generate import GenerateOptions, LoraRef, load_model, parse_lora_ref

SPEC = PromptSpec(
    prompt="a red square",
    negative_prompt="blurry",
    width=64,
    height=64,
    steps=2,
    seed=11,
    sampler="euler",
)
SMALL = ["--width", "64", "--height", "64", "--steps", "2"]


def pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    """The same random LoRA (TE + U-Net, rank 4, alpha 2) in the kohya and diffusers layouts."""
    from safetensors.torch import save_file

    from sdtrain.methods.adapters.diffusers_format import save_diffusers_lora
    from sdtrain.methods.adapters.kohya import state_dict
    from sdtrain.methods.adapters.lora import LoraNetwork, LoraSpec
    from sdtrain.models.builtin import load_builtin

    folder = tmp_path_factory.mktemp("loras")
    donor = load_builtin("builtin:tiny-sd1")
    network = LoraNetwork.create(donor.unet, donor.text_encoder, LoraSpec(dim=4, alpha=2.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    kohya = folder / "style.safetensors"
    save_file(state_dict(network), str(kohya))
    diffusers = folder / "style_diffusers.safetensors"
    save_diffusers_lora(diffusers, network, donor.unet, donor.text_encoder)
    return {"kohya": kohya, "diffusers": diffusers}


def image_of(bundle, spec: PromptSpec = SPEC) -> np.ndarray:
    from sdtrain.models.sampling import generate_images

    (result,) = generate_images(bundle, [spec])
    return pixels(result.image)


def options(tmp_path: Path, **kwargs) -> GenerateOptions:
    return GenerateOptions(model="builtin:tiny-sd1", out=tmp_path, **kwargs)


def test_cli_writes_pngs_with_parameters_and_a_sheet(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(
        [
            "generate",
            "--model",
            "builtin:tiny-sd1",
            "--prompt",
            "a cat --d 3",
            "--negative",
            "ugly",
            "--count",
            "2",
            "--batch-size",
            "2",
            "--sampler",
            "euler_a",
            "--cfg",
            "5",
            "--clip_skip",
            "2",
            *SMALL,
            "--out",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*_00_*.png"))
    assert [p.name.rsplit("_", 2)[1:] for p in pngs] == [["000", "3.png"], ["001", "4.png"]]
    assert read_parameters(pngs[1]) == (
        "a cat\nNegative prompt: ugly\nSteps: 2, Sampler: euler_a, CFG scale: 5, Seed: 4, "
        "Size: 64x64, Model: builtin:tiny-sd1, Clip skip: 2"
    )
    (sheet,) = out.glob("*_sheet.png")
    assert Image.open(sheet).width > 2 * 64
    assert all(str(p) in result.output for p in [*pngs, sheet])


def test_cli_from_file_is_deterministic(cli, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na cat --d 5 --ss dpmsolver++\na dog --d 6 --w 72 --l 3\n")
    runs = []
    for name in ("a", "b"):
        result = cli(
            [
                "generate",
                "--model",
                "builtin:tiny-sd1",
                "--from-file",
                str(prompts),
                *SMALL,
                "--out",
                str(tmp_path / name),
            ]
        )
        assert result.exit_code == 0, result.output
        runs.append(sorted((tmp_path / name).glob("*_0[01]_000_*.png")))
    first, second = runs
    assert [p.name.split("_", 1)[1] for p in first] == ["00_000_5.png", "01_000_6.png"]
    assert Image.open(first[1]).size == (72, 64)
    assert "Sampler: dpmsolver++" in read_parameters(first[0])
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_cli_usage_errors(cli, tmp_path: Path) -> None:
    base = ["generate", "--model", "builtin:tiny-sd1", "--out", str(tmp_path)]
    with pytest.raises(ConfigError, match="problem") as info:
        cli(base)
    assert "exactly one of --prompt or --from-file" in info.value.problems[0].message
    with pytest.raises(ConfigError) as info:
        cli([*base, "--prompt", "x", "--max_token_length", "100"])
    assert "75, 150 or 225" in info.value.problems[0].message
    with pytest.raises(ConfigError) as info:
        cli([*base, "--prompt", "x --ss nope"])
    assert "unknown sampler 'nope'" in info.value.problems[0].message
    assert not list(tmp_path.iterdir())


def test_lora_ref_parsing() -> None:
    assert parse_lora_ref("a.safetensors:0.5") == LoraRef(Path("a.safetensors"), 0.5)
    assert parse_lora_ref("dir/a.safetensors") == LoraRef(Path("dir/a.safetensors"), 1.0)
    assert parse_lora_ref("C:\\loras\\a.safetensors") == LoraRef(Path("C:\\loras\\a.safetensors"))
    assert parse_lora_ref("a.safetensors:-1") == LoraRef(Path("a.safetensors"), -1.0)


def test_lora_weight_zero_is_the_base_and_one_is_the_merge(tmp_path: Path, lora_files) -> None:
    from sdtrain.methods.adapters.apply import merge_lora_into
    from sdtrain.models.builtin import load_builtin

    base = image_of(load_builtin("builtin:tiny-sd1"))
    zero, _ = load_model(options(tmp_path, loras=(LoraRef(lora_files["kohya"], 0.0),)))
    assert np.array_equal(image_of(zero), base)
    live, _ = load_model(options(tmp_path, loras=(LoraRef(lora_files["kohya"], 1.0),)))
    merged = load_builtin("builtin:tiny-sd1")
    merge_lora_into(merged, lora_files["kohya"], 1.0)
    with_lora = image_of(live)
    assert np.abs(with_lora - base).mean() > 1  # the LoRA visibly changes the image
    assert np.abs(with_lora - image_of(merged)).max() <= 2


def test_lora_matches_diffusers_loader_and_layouts(tmp_path: Path, lora_files) -> None:
    from sdtrain.models.builtin import load_builtin
    from sdtrain.models.sampling import build_pipeline

    ours, _ = load_model(options(tmp_path, loras=(LoraRef(lora_files["kohya"], 1.0),)))
    reference = load_builtin("builtin:tiny-sd1")
    build_pipeline(reference).load_lora_weights(str(lora_files["kohya"]))
    ours_image = image_of(ours)
    assert np.abs(ours_image - image_of(reference)).max() <= 2
    from_diffusers, _ = load_model(options(tmp_path, loras=(LoraRef(lora_files["diffusers"]),)))
    assert np.abs(ours_image - image_of(from_diffusers)).max() <= 2


def test_two_loras_stack(tmp_path: Path, lora_files) -> None:
    half = (LoraRef(lora_files["kohya"], 0.5), LoraRef(lora_files["diffusers"], 0.5))
    stacked, _ = load_model(options(tmp_path, loras=half))
    single, _ = load_model(options(tmp_path, loras=(LoraRef(lora_files["kohya"], 1.0),)))
    assert np.abs(image_of(stacked) - image_of(single)).max() <= 2


def test_embedding_tokens_are_added_and_expanded(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "mytok.safetensors"
    save_file({"emb_params": vectors}, str(path))
    bundle, tokens = load_model(options(tmp_path, embeddings=(path,)))
    assert tokens == {"mytok": ["mytok", "mytok1"]}
    ids = bundle.tokenizer("a photo of mytok", add_special_tokens=False).input_ids
    assert ids[-1] == 49408
    table = bundle.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[49408:49410], vectors)


def test_generate_with_embedding_keeps_the_written_prompt(cli, tmp_path: Path) -> None:
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    torch.save({"string_to_param": {"*": vectors}, "name": "zqthing"}, tmp_path / "zqthing.pt")
    out = tmp_path / "out"
    result = cli(
        [
            "generate",
            "--model",
            "builtin:tiny-sd1",
            "--embedding",
            str(tmp_path / "zqthing.pt"),
            "--prompt",
            "a zqthing --d 1",
            *SMALL,
            "--out",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    (png,) = out.glob("*_00_000_1.png")
    assert read_parameters(png).startswith("a zqthing\n")
    assert "Embeddings: zqthing.pt" in read_parameters(png)


def test_expanded_prompt_changes_the_image(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "zq.safetensors"
    save_file(
        {"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3)) * 5},
        str(path),
    )
    bundle, tokens = load_model(options(tmp_path, embeddings=(path,)))
    from sdtrain.tools.generate import apply_embedding_tokens

    (expanded,) = apply_embedding_tokens([replace(SPEC, prompt="a zq square")], tokens)
    assert expanded.prompt == "a zq zq1 square"
    assert not np.array_equal(image_of(bundle, expanded), image_of(bundle, SPEC))


def test_cli_help_lists_the_options(cli) -> None:
    result = cli(["generate", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--model",
        "--lora",
        "--embedding",
        "--from-file",
        "--sampler",
        "--count",
        "--batch-size",
        "--clip_skip",
        "--out",
    ):
        assert flag in result.output


def test_generate_loads_an_xti_file(tmp_path: Path) -> None:
    """An XTI file conditions each UNet site on its own rows; equal rows at every site give
    exactly the image of the same vectors as a plain embedding."""
    from sdtrain.models.embeddings import write_embedding, write_xti

    sites = ["IN01", "MID", "OUT02", "OUT03"]  # tiny-sd1's cross-attention sites
    same = torch.randn(2, 32, generator=torch.Generator().manual_seed(4)) * 5
    xti = write_xti(tmp_path / "zqx.safetensors", {s: same for s in sites}, None)
    plain = write_embedding(tmp_path / "plain" / "zqx.safetensors", same, token="zqx")
    spec = replace(SPEC, prompt="a zqx zqx1 square")
    bundle, tokens = load_model(options(tmp_path, embeddings=(xti,)))
    assert tokens == {"zqx": ["zqx", "zqx1"]} and bundle.embeddings.xti is not None
    from_xti = image_of(bundle, spec)
    plain_bundle, _ = load_model(options(tmp_path, embeddings=(plain,)))
    np.testing.assert_array_equal(from_xti, image_of(plain_bundle, spec))
    shift = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 5
    varied = {s: same + shift if s == "MID" else same for s in sites}  # only MID differs
    other = write_xti(tmp_path / "other" / "zqx.safetensors", varied, None)
    varied_bundle, _ = load_model(options(tmp_path, embeddings=(other,)))
    assert not np.array_equal(image_of(varied_bundle, spec), from_xti)
