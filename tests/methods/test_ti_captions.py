"""TI captions: reference template lists, seeded draws, whole-word expansion, missing tokens."""

from __future__ import annotations

import logging

import torch

from sdtrain.methods.ti_captions import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    TiCaptions,
    captions_without_token,
    templates_for,
    warn_missing_token,
)


def test_template_lists_are_the_reference_ones() -> None:
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    assert (
        OBJECT_TEMPLATES[0] == "a photo of a {}" and OBJECT_TEMPLATES[-1] == "a photo of a small {}"
    )
    assert STYLE_TEMPLATES[-1] == "a large painting in the style of {}"
    assert templates_for(True, True) is OBJECT_TEMPLATES
    assert templates_for(False, True) is STYLE_TEMPLATES
    assert templates_for(False, False) is None


def test_templates_come_from_the_step_generator() -> None:
    captions = TiCaptions("shs", ["shs", "shs1"], OBJECT_TEMPLATES)
    draw = lambda seed: captions(["ignored"] * 6, torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert all("shs shs1" in c and "ignored" not in c for c in draw(1))


def test_captions_expand_the_token_as_whole_words() -> None:
    captions = TiCaptions("shs", ["shs", "shs1", "shs2"], None)
    out = captions(["shs pattern", "a shsx, SHS"], torch.Generator())
    assert out == ["shs shs1 shs2 pattern", "a shsx, shs shs1 shs2"]
    assert captions.expand("no token") == "no token"


def test_missing_token_is_warned_once_with_a_count(caplog) -> None:
    entries = [("a.png", "shs pattern"), ("b.png", "pattern"), ("c.png", "shsy")]
    missing = captions_without_token(entries, "shs")
    assert missing == ["b.png", "c.png"]
    with caplog.at_level(logging.WARNING):
        warn_missing_token(missing, 3, "shs")
        warn_missing_token([], 3, "shs")
    assert len(caplog.records) == 1
    assert "2 of 3 captions" in caplog.text and "b.png" in caplog.text
