"""A1111-style caption weights: parsing (§5.6) and weighted, chunked token ids (§5.3)."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest

from sdtrain.data.prompt_weights import parse_prompt_attention, tokenize_weighted

BOS, EOS = 49406, 49407


class WordTokenizer:
    """Stand-in for CLIPTokenizer: one id per word or punctuation mark."""

    def __init__(self, pad_token_id: int = EOS) -> None:
        self.bos_token_id, self.eos_token_id, self.pad_token_id = BOS, EOS, pad_token_id
        self.vocab: dict[str, int] = {}

    def id(self, word: str) -> int:
        return self.vocab.setdefault(word, 100 + len(self.vocab))

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = [self.id(w) for w in re.findall(r"\w+|[^\w\s]", text)]
        return SimpleNamespace(input_ids=[BOS, *ids, EOS] if add_special_tokens else ids)


def approx_runs(runs):
    return [(text, pytest.approx(weight)) for text, weight in runs]


def test_reference_example():
    runs = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert runs == approx_runs(
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ]
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("", [("", 1.0)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[(a:2)]", [("a", 2 / 1.1)]),
        ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("ratio 16:9", [("ratio 16:9", 1.0)]),
        ("x:1.5) y", [("x:1.5) y", 1.0)]),
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),
        ("a\\b", [("ab", 1.0)]),
    ],
)
def test_syntax(text, expected):
    assert parse_prompt_attention(text) == approx_runs(expected)


def test_single_window_layout():
    tok = WordTokenizer()
    ids, weights = tokenize_weighted(tok, ["a (red:1.5) cat"], None)
    assert ids.shape == (1, 1, 77) and weights.shape == (1, 1, 77)
    assert ids.dtype.is_floating_point is False and weights.dtype.is_floating_point
    red, cat = tok.id("red"), tok.id("cat")
    assert ids[0, 0, :5].tolist() == [BOS, tok.id("a"), red, cat, EOS]
    assert ids[0, 0, 5:].tolist() == [EOS] * 72  # SD1 pads with EOS
    assert weights[0, 0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1.0, 1.0])
    assert weights[0, 0, 5:].tolist() == [1.0] * 72
    same, _ = tokenize_weighted(tok, ["a (red:1.5) cat"], 75)
    assert same.shape == (1, 1, 77)


def test_reference_example_weights_land_on_their_tokens():
    tok = WordTokenizer()
    ids, weights = tokenize_weighted(
        tok, ["a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."], None
    )
    by_id = dict(zip(ids[0, 0].tolist(), weights[0, 0].tolist(), strict=True))
    assert by_id[tok.id("house")] == pytest.approx(1.573)
    assert by_id[tok.id("on")] == pytest.approx(1.0)
    assert by_id[tok.id("hill")] == pytest.approx(0.55)
    assert by_id[tok.id("sky")] == pytest.approx(1.4641)


def test_long_caption_chunks_ids_and_weights_together_sd1():
    tok = WordTokenizer()
    words = [f"w{i}" for i in range(100)]
    caption = " ".join(words[:80]) + " (" + " ".join(words[80:]) + ":2)"
    ids, weights = tokenize_weighted(tok, [caption, "short"], 150)
    assert ids.shape == (2, 2, 77) and weights.shape == (2, 2, 77)
    content = [tok.id(w) for w in words]
    assert ids[0, 0].tolist() == [BOS, *content[:75], EOS]  # last token of the whole row
    assert ids[0, 1, :27].tolist() == [BOS, *content[75:100], EOS]
    assert weights[0, 0].tolist() == [1.0] * 77
    assert weights[0, 1, 1:6].tolist() == [1.0] * 5  # w75..w79
    assert weights[0, 1, 6:26].tolist() == [2.0] * 20  # w80..w99
    assert weights[0, 1, 26:].tolist() == [1.0] * 51
    assert ids[1, 1].tolist() == [BOS] + [EOS] * 76


def test_sd2_windows_are_closed_with_eos_and_empty_ones_start_with_eos():
    tok = WordTokenizer(pad_token_id=0)
    words = " ".join(f"w{i}" for i in range(80))
    ids, _ = tokenize_weighted(tok, [words, ""], 150)
    assert ids[0, 0, -1].item() == EOS  # content continues past window 0
    assert ids[0, 1, :7].tolist() == [BOS, *[tok.id(f"w{i}") for i in range(75, 80)], EOS]
    assert ids[0, 1, 7:].tolist() == [0] * 70
    assert ids[1, 1, :3].tolist() == [BOS, EOS, 0]  # empty window


def test_truncation_warns_and_keeps_the_budget(caplog):
    tok = WordTokenizer()
    caption = " ".join(f"w{i}" for i in range(300))
    with caplog.at_level(logging.WARNING, logger="sdtrain.data.prompt_weights"):
        ids, weights = tokenize_weighted(tok, [caption], 225)
    assert "truncated" in caplog.text
    assert ids.shape == (1, 3, 77)
    assert ids[0, 2, 75].item() == tok.id("w224") and ids[0, 2, 76].item() == EOS
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdtrain.data.prompt_weights"):
        tokenize_weighted(tok, ["short"], 225)
    assert "truncated" not in caplog.text
