"""TextConditionCache: caption-keyed frozen text-encoder outputs (hits, exactness, memory cap)."""

from __future__ import annotations

import pytest
import torch

from sdtrain.models.text_cache import TextConditionCache


@pytest.fixture
def encoder():
    """A tiny CLIP text model and an encode(captions) -> (B, 77, 32) that counts its calls."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=300,
            max_position_embeddings=77,
        )
    ).eval()
    calls: list[list[str]] = []

    def encode(captions: list[str]) -> torch.Tensor:
        calls.append(list(captions))
        ids = torch.zeros(len(captions), 77, dtype=torch.long)
        for row, caption in enumerate(captions):
            codes = [ord(c) % 300 for c in caption[:77]]
            ids[row, : len(codes)] = torch.tensor(codes)
        return model(ids).last_hidden_state

    encode.calls = calls  # type: ignore[attr-defined]
    return encode


def test_encodes_each_caption_once_and_counts_hits(encoder):
    cache = TextConditionCache(encoder)
    first = cache(["a cat", "a dog"])
    second = cache(["a dog", "a cat", "a cat"])
    assert first.shape == (2, 77, 32) and second.shape == (3, 77, 32)
    assert encoder.calls == [["a cat"], ["a dog"]]
    assert (cache.hits, cache.misses, len(cache)) == (3, 2, 2)
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])


def test_rows_equal_a_fresh_single_caption_encode(encoder):
    cache = TextConditionCache(encoder)
    cache(["a cat", "a dog"])
    cached = cache(["a dog"])
    with torch.no_grad():
        fresh = encoder(["a dog"])
    assert torch.equal(cached, fresh)


def test_output_has_no_graph(encoder):
    out = TextConditionCache(encoder)(["a cat"])
    assert not out.requires_grad and out.grad_fn is None


def test_memory_cap_keeps_the_first_entries_and_still_answers(encoder):
    row_bytes = 77 * 32 * 4
    cache = TextConditionCache(encoder, max_bytes=2 * row_bytes)
    out = cache(["one", "two", "three"])
    assert len(cache) == 2 and cache.bytes == 2 * row_bytes
    assert "three" not in cache and "one" in cache
    again = cache(["three"])
    assert torch.equal(again[0], out[2])
    assert encoder.calls[-1] == ["three"]  # not kept: encoded again
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_rejects_encoders_that_do_not_return_one_row(encoder):
    cache = TextConditionCache(lambda captions: torch.zeros(2, 77, 32))
    with pytest.raises(ValueError, match=r"expected \(1, L, D\)"):
        cache(["x"])
