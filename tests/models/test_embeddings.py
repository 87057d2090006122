"""Textual-inversion embedding files and tokens: formats, errors, T -> "T T1 ..." expansion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtrain.errors import ModelLoadError
from sdtrain.models.embeddings import (
    add_embedding,
    expand_tokens,
    read_embedding,
    token_strings,
)

VECTORS = torch.arange(6, dtype=torch.float32).reshape(2, 3)


@pytest.fixture(scope="module")
def bundle_factory():
    from sdtrain.models.builtin import load_builtin

    return lambda: load_builtin("builtin:tiny-sd1")


def test_reads_every_supported_layout(tmp_path: Path) -> None:
    save_file({"emb_params": VECTORS}, str(tmp_path / "a.safetensors"))
    save_file({"whatever": VECTORS}, str(tmp_path / "b.safetensors"))
    torch.save({"string_to_param": {"*": VECTORS}, "name": "c", "step": 3}, tmp_path / "c.pt")
    torch.save({"emb_params": VECTORS}, tmp_path / "d.pt")
    torch.save({"<tok>": VECTORS[0]}, tmp_path / "e.bin")  # diffusers learned_embeds, 1-D
    for name in ("a.safetensors", "b.safetensors", "c.pt", "d.pt"):
        torch.testing.assert_close(read_embedding(tmp_path / name), VECTORS)
    assert read_embedding(tmp_path / "e.bin").shape == (1, 3)


def test_unusable_files_raise_model_load_errors(tmp_path: Path) -> None:
    save_file({f"IN{i:02d}": VECTORS.clone() for i in range(16)}, str(tmp_path / "xti.safetensors"))
    save_file({"a": VECTORS, "b": VECTORS.clone()}, str(tmp_path / "two.safetensors"))
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    (tmp_path / "x.txt").write_text("hi")
    cases = {
        "xti.safetensors": "XTI",
        "two.safetensors": "no emb_params",
        "broken.pt": "cannot read",
        "x.txt": "unknown file type",
        "missing.pt": "not found",
    }
    for name, text in cases.items():
        with pytest.raises(ModelLoadError, match=text):
            read_embedding(tmp_path / name)


def test_add_embedding_appends_consecutive_tokens(bundle_factory) -> None:
    bundle = bundle_factory()
    vectors = torch.randn(3, 32)
    names = add_embedding(bundle, "zqmark", vectors)
    assert names == token_strings("zqmark", 3) == ["zqmark", "zqmark1", "zqmark2"]
    assert bundle.tokenizer.convert_tokens_to_ids(names) == [49408, 49409, 49410]
    weight = bundle.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == 49411
    torch.testing.assert_close(weight[49408:], vectors)


def test_add_embedding_rejects_wrong_width_and_existing_tokens(bundle_factory) -> None:
    bundle = bundle_factory()
    with pytest.raises(ModelLoadError, match="width 768"):
        add_embedding(bundle, "zqmark", torch.zeros(1, 768))
    with pytest.raises(ModelLoadError, match="already exist"):
        add_embedding(bundle, "cat", torch.zeros(1, 32))
    add_embedding(bundle, "zqmark", torch.zeros(1, 32))
    with pytest.raises(ModelLoadError, match="already exist"):
        add_embedding(bundle, "zqmark", torch.zeros(1, 32))


def test_expand_tokens_whole_words_case_insensitive() -> None:
    names = ["tok", "tok1", "tok2"]
    assert expand_tokens("a tok, (Tok:1.2) tokens stok", "tok", names) == (
        "a tok tok1 tok2, (tok tok1 tok2:1.2) tokens stok"
    )
    assert expand_tokens("a tok", "tok", ["tok"]) == "a tok"
    assert expand_tokens("a t\\ok", "t\\ok", ["t\\ok", "t\\ok1"]) == "a t\\ok t\\ok1"


def test_written_forms_read_back(tmp_path: Path) -> None:
    from safetensors import safe_open

    from sdtrain.models.embeddings import write_embedding

    vectors = torch.randn(3, 8)
    meta = {"modelspec.architecture": "stable-diffusion-v1/textual-inversion"}
    st = write_embedding(tmp_path / "a.safetensors", vectors, token="a", metadata=meta)
    pt = write_embedding(tmp_path / "b.pt", vectors, token="b")
    a1111 = write_embedding(tmp_path / "c.pt", vectors, token="c", a1111=True, step=7)
    for path in (st, pt, a1111):
        assert torch.equal(read_embedding(path), vectors)
    with safe_open(str(st), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        assert handle.metadata() == meta
    assert set(torch.load(pt, weights_only=True)) == {"emb_params"}
    loaded = torch.load(a1111, weights_only=True)  # plain types only
    assert loaded["name"] == "c" and loaded["step"] == 7
    assert torch.equal(loaded["string_to_param"]["*"], vectors)
    with pytest.raises(ValueError):
        write_embedding(tmp_path / "d.safetensors", vectors, token="d", a1111=True)


def test_xti_files_round_trip_in_reference_order(tmp_path: Path) -> None:
    from safetensors import safe_open

    from sdtrain.models.embeddings import XTI_LAYERS, is_xti, read_xti, write_xti

    assert list(XTI_LAYERS) == sorted(XTI_LAYERS) and len(XTI_LAYERS) == 16
    layers = {name: torch.randn(2, 8) for name in XTI_LAYERS}
    path = write_xti(tmp_path / "x.safetensors", layers, {"modelspec.title": "x"})
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == list(XTI_LAYERS)
        assert torch.equal(handle.get_tensor("OUT03"), layers["OUT03"])
    read = read_xti(path)
    assert is_xti(path) and list(read) == list(XTI_LAYERS)
    assert all(torch.equal(read[k], layers[k]) for k in XTI_LAYERS)
    # the reference's loader: any 16 tensors, in file order
    save_file(
        {f"t{i:02d}": layers[k] for i, k in enumerate(XTI_LAYERS)}, str(tmp_path / "u.safetensors")
    )
    assert all(torch.equal(read_xti(tmp_path / "u.safetensors")[k], layers[k]) for k in XTI_LAYERS)
    plain = tmp_path / "plain.safetensors"
    save_file({"emb_params": layers["MID"]}, str(plain))
    assert not is_xti(plain)
    with pytest.raises(ModelLoadError, match="not an XTI file"):
        read_xti(plain)
    with pytest.raises(ModelLoadError, match="XTI"):
        read_embedding(path)


def test_xti_site_names_follow_the_reference_numbering() -> None:
    from diffusers import UNet2DConditionModel

    from sdtrain.models.embeddings import XTI_LAYERS
    from sdtrain.models.families import config_dir
    from sdtrain.models.xti import site_names

    for name in ("sd1", "sd2-768-v"):
        config = UNet2DConditionModel.load_config(str(config_dir(name) / "unet"))
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        assert site_names(unet) == list(XTI_LAYERS), name


def _our_prompt_embedding(bundle, path: Path, prompt: str) -> torch.Tensor:
    from sdtrain.models.sampling import encode_prompts

    names = add_embedding(bundle, path.stem, read_embedding(path))
    return encode_prompts(bundle, [expand_tokens(prompt, path.stem, names)], None, None)


@pytest.mark.parametrize("suffix,a1111", [(".safetensors", False), (".pt", False), (".pt", True)])
def test_diffusers_load_textual_inversion_reads_our_files(
    tmp_path: Path, bundle_factory, suffix: str, a1111: bool
) -> None:
    """diffusers loads what we write; its prompt embedding equals ours (multi-vector token)."""
    from sdtrain.models.embeddings import write_embedding
    from sdtrain.models.sampling import build_pipeline

    vectors = torch.randn(3, 32) * 0.05
    path = write_embedding(
        tmp_path / f"zqtok{suffix}", vectors, token="zqtok", a1111=a1111, metadata=None
    )
    prompt = "a photo of zqtok on grass"
    ours = _our_prompt_embedding(bundle_factory(), path, prompt)
    theirs_bundle = bundle_factory()
    pipe = build_pipeline(theirs_bundle)
    pipe.load_textual_inversion(str(path), token="zqtok")
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    assert not torch.equal(ours, _our_prompt_embedding(bundle_factory(), path, "a photo of cat"))
