"""NewTokenRows: new token ids read their own trainable rows; the base matrix never changes."""

from __future__ import annotations

import pytest
import torch

from sdtrain.models.token_rows import (
    NewTokenRows,
    install_rows,
    layer_ids,
    taken_tokens,
    word_ids,
)


@pytest.fixture
def bundle():
    from sdtrain.models.builtin import load_builtin

    return load_builtin("builtin:tiny-sd1")


def test_new_rows_equal_a_grown_matrix(bundle) -> None:
    base = torch.nn.Embedding(10, 4)
    rows = torch.randn(3, 4)
    module = NewTokenRows(base, rows)
    ids = torch.tensor([[0, 9, 10, 12, 3]])
    grown = torch.cat([base.weight, rows])
    assert torch.equal(module(ids), grown[ids])


def test_only_the_rows_get_gradients_and_change(bundle) -> None:
    te, tokenizer = bundle.text_encoder, bundle.tokenizer
    te.requires_grad_(False)
    before = te.get_input_embeddings().weight.detach().clone()
    module = install_rows(tokenizer, te, ["zqtok", "zqtok1"], torch.randn(2, 32))
    ids = tokenizer(
        ["zqtok zqtok1 on a cat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    assert ids[0, 1:3].tolist() == [49408, 49409]
    optimizer = torch.optim.AdamW([module.rows], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        te(ids).last_hidden_state.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert module.base.weight.grad is None
    assert torch.equal(te.get_input_embeddings().base.weight, before)
    assert te.get_input_embeddings() is module


def test_install_refuses_taken_and_mismatched(bundle) -> None:
    assert taken_tokens(bundle.tokenizer, ["cat", "zqtok", "Cat"]) == ["cat", "Cat"]
    assert word_ids(bundle.tokenizer, "   ") == []
    assert word_ids(bundle.tokenizer, "cat") == [2368]
    with pytest.raises(ValueError):
        install_rows(bundle.tokenizer, bundle.text_encoder, ["zq"], torch.zeros(1, 768))


def test_layer_ids_shift_new_ids_by_layer_blocks() -> None:
    ids = torch.tensor([[1, 20, 21, 5]])
    shifted = layer_ids(ids, first=20, count=2, layers=3)
    assert shifted.shape == (3, 1, 4)
    assert shifted[:, 0].tolist() == [[1, 20, 21, 5], [1, 22, 23, 5], [1, 24, 25, 5]]
