"""75-token chunks, clip skip, long-prompt re-joining and per-token weights (reference §5.3-5.6)."""

from __future__ import annotations

import pytest
import torch

from sdtrain.data.prompt_weights import tokenize_weighted
from sdtrain.models.builtin import build_random_components
from sdtrain.models.text import encode_captions, encode_tokens, tokenize
from sdtrain.models.tokenizer import load_tokenizer

BOS, EOS, CAT = 49406, 49407, 2368


@pytest.fixture(scope="module")
def tok1():
    return load_tokenizer("sd1")


@pytest.fixture(scope="module")
def tok2():
    return load_tokenizer("sd2")


@pytest.fixture(scope="module")
def te1():
    return build_random_components("tiny-sd1")[2]


@pytest.fixture(scope="module")
def te2():
    return build_random_components("tiny-sd2")[2]


def cats(n: int) -> str:
    return " ".join(["cat"] * n)


def test_default_budget_is_one_window(tok1):
    ids = tokenize(tok1, ["a photo of a cat", ""], None)
    assert ids.shape == (2, 1, 77)
    assert ids[0, 0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert ids[1, 0, :2].tolist() == [BOS, EOS] and set(ids[1, 0, 2:].tolist()) == {EOS}
    assert torch.equal(tokenize(tok1, ["x"], 75), tokenize(tok1, ["x"], None))


@pytest.mark.parametrize(("budget", "n"), [(150, 2), (225, 3)])
def test_long_budget_shapes_and_truncation(tok1, budget, n):
    ids = tokenize(tok1, [cats(300), "a cat"], budget)
    assert ids.shape == (2, n, 77)
    # every window starts with BOS; content is truncated silently to the budget
    assert (ids[:, :, 0] == BOS).all()
    assert (ids[0, :, 1:76] == CAT).all()
    # SD1 (pad == eos): each window ends with the last token of the whole sequence (EOS here)
    assert (ids[:, :, 76] == EOS).all()


def test_sd1_window_layout(tok1):
    ids = tokenize(tok1, [cats(80)], 150)[0]
    assert (ids[0, 1:76] == CAT).all()
    assert ids[1, 1:6].tolist() == [CAT] * 5 and ids[1, 6].item() == EOS
    assert (ids[1, 7:] == EOS).all()


def test_sd2_fixups(tok2):
    # 80 content tokens: window 0 is full of content and continues -> its last id becomes EOS;
    # window 2 is empty -> BOS EOS PAD ...
    ids = tokenize(tok2, [cats(80)], 225)[0]
    assert ids[0, 75].item() == CAT and ids[0, 76].item() == EOS
    assert ids[1, :7].tolist() == [BOS] + [CAT] * 5 + [EOS]
    assert ids[1, 7:].tolist() == [0] * 70
    assert ids[2, :3].tolist() == [BOS, EOS, 0] and (ids[2, 3:] == 0).all()
    # a short caption: window 0 keeps its PAD tail; later windows are "empty" windows
    short = tokenize(tok2, ["a cat"], 150)[0]
    assert short[0, :4].tolist() == [BOS, 320, CAT, EOS] and short[0, 76].item() == 0
    assert short[1, :3].tolist() == [BOS, EOS, 0]


def test_encode_shapes(tok1, te1):
    ids = tokenize(tok1, [cats(200), "a cat"], 225)
    states = encode_tokens(te1, ids, None)
    assert states.shape == (2, 227, 32)
    assert encode_tokens(te1, tokenize(tok1, ["a"], 150), None).shape == (1, 152, 32)
    assert encode_tokens(te1, tokenize(tok1, ["a"], None), None).shape == (1, 77, 32)


@pytest.mark.parametrize("skip", [1, 2])
def test_clip_skip_is_hidden_state_plus_final_norm(tok1, te1, skip):
    ids = tokenize(tok1, ["a photo of a cat"], None)
    got = encode_tokens(te1, ids, skip)
    with torch.no_grad():
        out = te1(ids[:, 0], output_hidden_states=True)
        want = te1.final_layer_norm(out.hidden_states[-skip])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if skip == 1:
        torch.testing.assert_close(got, out.last_hidden_state)
    else:
        assert not torch.allclose(got, out.last_hidden_state)


def test_long_prompt_rejoin(tok1, te1):
    ids = tokenize(tok1, [cats(100)], 150)
    got = encode_tokens(te1, ids, None)
    with torch.no_grad():
        per_window = te1(ids[0]).last_hidden_state  # (2, 77, D)
    torch.testing.assert_close(got[0, 0], per_window[0, 0])
    torch.testing.assert_close(got[0, 1:76], per_window[0, 1:76])
    torch.testing.assert_close(got[0, 76:151], per_window[1, 1:76])
    torch.testing.assert_close(got[0, 151], per_window[1, 76])


def test_sd2_empty_window_uses_pad_state(tok2, te2):
    ids = tokenize(tok2, ["a cat"], 225)
    got = encode_captions(tok2, te2, ["a cat"], 225)
    with torch.no_grad():
        per_window = te2(ids[0]).last_hidden_state
    # window 1 and 2 are empty (BOS EOS PAD...): the EOS state is replaced by the next PAD state
    torch.testing.assert_close(got[0, 76], per_window[1, 2])
    torch.testing.assert_close(got[0, 151], per_window[2, 2])
    assert not torch.allclose(per_window[1, 1], per_window[1, 2])
    # window 0 is untouched
    torch.testing.assert_close(got[0, 1:76], per_window[0, 1:76])
    # SD1 (pad == eos) is never changed
    tok1 = load_tokenizer("sd1")
    ids1 = tokenize(tok1, ["a cat"], 150)
    with torch.no_grad():
        windows1 = te2(ids1[0]).last_hidden_state
    torch.testing.assert_close(encode_tokens(te2, ids1, None)[0, 76], windows1[1, 1])


def test_weights_multiply_positionwise(tok1, te1):
    ids, weights = tokenize_weighted(tok1, ["a (cat:1.5) (on a hill:0.5)"], None)
    assert torch.equal(ids, tokenize(tok1, ["a cat on a hill"], None))
    assert weights[0, 0, :7].tolist() == [1.0, 1.0, 1.5, 0.5, 0.5, 0.5, 1.0]
    plain = encode_tokens(te1, ids, None)
    weighted = encode_tokens(te1, ids, None, weights)
    torch.testing.assert_close(weighted[0, 2], plain[0, 2] * 1.5)
    torch.testing.assert_close(weighted[0, 3], plain[0, 3] * 0.5)
    torch.testing.assert_close(weighted[0, 0], plain[0, 0])
    torch.testing.assert_close(encode_tokens(te1, ids, None, torch.ones_like(weights)), plain)
    renorm = encode_tokens(te1, ids, None, weights, renormalize=True)
    torch.testing.assert_close(renorm.mean(), plain.mean(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(renorm, weighted)


def test_weighted_windows_line_up_with_the_ids(tok2):
    ids, weights = tokenize_weighted(tok2, [f"{cats(70)} ({cats(10)}:2)"], 150)
    assert ids.shape == weights.shape == (1, 2, 77)
    assert torch.equal(ids, tokenize(tok2, [cats(80)], 150))
    assert weights[0, 0, 1:71].eq(1.0).all() and weights[0, 0, 71:76].eq(2.0).all()
    assert weights[0, 1, 1:6].eq(2.0).all() and weights[0, 1, 6:].eq(1.0).all()
    assert weights[0, :, 0].eq(1.0).all() and weights[0, :, 76].eq(1.0).all()
