"""The bundled CLIP tokenizer: ids equal to the real SD1/SD2 tokenizers, padding, cache dir."""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest

from sdtrain.errors import ConfigError
from sdtrain.models.tokenizer import build_tokenizer, load_tokenizer

# Known ids of openai/clip-vit-large-patch14 (the real SD1 tokenizer).
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bundled_vocab_is_the_published_file():
    asset = (
        resources.files("sdtrain.models") / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    )
    digest = hashlib.sha256(asset.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert (asset.parent / "OPENCLIP_LICENSE.txt").is_file()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_reference_ids(family):
    tok = load_tokenizer(family)
    assert tok("a photo of a cat").input_ids == CAT
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407


def test_padding_differs_between_families():
    sd1, sd2 = load_tokenizer("sd1"), load_tokenizer("sd2")
    assert sd1.pad_token_id == 49407
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0
    ids1 = sd1("a cat", padding="max_length", max_length=77).input_ids
    ids2 = sd2("a cat", padding="max_length", max_length=77).input_ids
    assert ids1[:4] == ids2[:4] == [49406, 320, 2368, 49407]
    assert set(ids1[4:]) == {49407} and set(ids2[4:]) == {0}


def test_more_known_ids():
    tok = build_tokenizer("sd1")
    # a lone "!" is the word "!</w>" (256), while SD2's pad "!" is byte-level token 0
    assert tok("!").input_ids == [49406, 256, 49407]
    assert tok("A  PHOTO").input_ids == tok("a photo").input_ids
    assert tok.convert_ids_to_tokens([320, 1125]) == ["a</w>", "photo</w>"]


def test_each_call_is_independent():
    a, b = build_tokenizer("sd1"), build_tokenizer("sd1")
    a.add_tokens(["<my-token>"])
    assert len(a) == 49409 and len(b) == 49408


def test_unknown_family():
    with pytest.raises(ConfigError) as info:
        load_tokenizer("sdxl")
    assert "sd1" in info.value.problems[0].message


def test_cache_dir_is_filled_then_reused(tmp_path):
    first = load_tokenizer("sd2", str(tmp_path))
    saved = tmp_path / "stabilityai_stable-diffusion-2"
    assert saved.is_dir()
    again = load_tokenizer("sd2", str(tmp_path))
    assert again("a photo of a cat").input_ids == first("a photo of a cat").input_ids == CAT
    assert again.pad_token == "!"
    # sd1 gets its own folder, named like the reference toolkit's
    load_tokenizer("sd1", str(tmp_path))
    assert (tmp_path / "openai_clip-vit-large-patch14").is_dir()


def test_cache_dir_with_a_user_tokenizer(tmp_path):
    tok = build_tokenizer("sd1")
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer("sd1", str(tmp_path))
    assert len(loaded) == 49409
