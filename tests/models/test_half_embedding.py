"""The frozen token embedding kept half in fp32 runs: exact, gated, invisible to the engine."""

from __future__ import annotations

import copy

import pytest
import torch

from sdtrain.engine.halfweights import has_frozen_half
from sdtrain.engine.precision import Precision, apply_precision
from sdtrain.models import half_embedding
from sdtrain.models.half_embedding import HalfTokenEmbedding, keep_token_embedding_half


def _encoder(tiny_sd1, to: torch.dtype | None = torch.float16) -> torch.nn.Module:
    """A copy of the tiny text encoder, frozen, its token embedding's values exact in `to`."""
    encoder = copy.deepcopy(tiny_sd1.text_encoder).requires_grad_(False)
    if to is not None:
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight.copy_(weight.to(to).float())
    return encoder


def _ids(encoder: torch.nn.Module) -> torch.Tensor:
    vocab = encoder.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (2, 77), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_exact_values_become_a_half_buffer_with_the_same_outputs(tiny_sd1, half):
    encoder = _encoder(tiny_sd1, half)
    if half == torch.bfloat16:  # out of float16's range: only bf16 holds these exactly
        with torch.no_grad():
            weight = encoder.get_input_embeddings().weight
            weight.copy_((weight * 1e5).bfloat16().float())
            weight[0, 0] = 2.0**20  # exact in bf16, beyond float16's largest value
    reference = copy.deepcopy(encoder)
    keys = set(encoder.state_dict())
    ids = _ids(encoder)

    assert keep_token_embedding_half(encoder)
    embedding = encoder.get_input_embeddings()
    assert isinstance(embedding, HalfTokenEmbedding)
    assert embedding.weight.dtype == half
    assert "weight" in dict(embedding.named_buffers())
    assert list(embedding.parameters()) == []
    original = reference.get_input_embeddings()
    assert (embedding.num_embeddings, embedding.embedding_dim) == (
        original.num_embeddings,
        original.embedding_dim,
    )
    assert torch.equal(embedding.weight.float(), original.weight)
    # the engine and diffusers' pipelines still see an all-fp32 text encoder
    assert encoder.dtype == torch.float32
    assert not has_frozen_half([encoder])
    assert set(encoder.state_dict()) == keys
    with torch.no_grad():
        out, expected = encoder(ids), reference(ids)
    assert out.last_hidden_state.dtype == torch.float32
    assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(out.pooler_output, expected.pooler_output)


def test_gradients_through_the_encoder_are_unchanged(tiny_sd1):
    """A trained layer after the embedding (the text-encoder LoRA's case) gets the same
    gradient."""
    encoder = _encoder(tiny_sd1)
    reference = copy.deepcopy(encoder)
    keep_token_embedding_half(encoder)
    ids = _ids(encoder)
    grads = []
    for model in (encoder, reference):
        layer = model.encoder.layers[0].self_attn.q_proj
        layer.weight.requires_grad_(True)
        model(ids).last_hidden_state.square().sum().backward()
        grads.append(layer.weight.grad)
    assert torch.equal(grads[0], grads[1])


def test_values_not_exact_in_half_stay_fp32(tiny_sd1):
    encoder = _encoder(tiny_sd1, to=None)  # random fp32 values
    assert not keep_token_embedding_half(encoder)
    embedding = encoder.get_input_embeddings()
    assert type(embedding) is torch.nn.Embedding and embedding.weight.dtype == torch.float32


def test_already_half_or_opted_out_stays(tiny_sd1, monkeypatch):
    encoder = _encoder(tiny_sd1)
    monkeypatch.setenv(half_embedding.OPT_OUT, "fp32")
    assert not keep_token_embedding_half(encoder)
    assert type(encoder.get_input_embeddings()) is torch.nn.Embedding
    monkeypatch.delenv(half_embedding.OPT_OUT)
    halved = copy.deepcopy(encoder).half()  # keep_half's frozen-half model: not replaced
    assert not keep_token_embedding_half(halved)
    assert type(halved.get_input_embeddings()) is torch.nn.Embedding


def test_apply_precision_keeps_the_half_buffer(tiny_sd1):
    encoder = _encoder(tiny_sd1)
    keep_token_embedding_half(encoder)
    fp32 = Precision("no", torch.float32, torch.float32, torch.float32)
    apply_precision([encoder], fp32)
    assert encoder.get_input_embeddings().weight.dtype == torch.float16
    # other fp32 buffers and parameters are cast as before
    bf16 = Precision("bf16", torch.bfloat16, torch.float32, torch.bfloat16)
    apply_precision([encoder], bf16)
    assert encoder.dtype == torch.bfloat16
    assert encoder.get_input_embeddings().weight.dtype == torch.float16


def test_only_lora_in_fp32_without_autocast():
    from sdtrain.methods.dreambooth import DreamBoothMethod
    from sdtrain.methods.finetune import FinetuneMethod
    from sdtrain.methods.lora import LoraMethod
    from sdtrain.methods.ti import TiMethod
    from sdtrain.run.train import _half_token_embedding

    fp32 = Precision("no", torch.float32, torch.float32, torch.float32)
    bf16 = Precision("bf16", torch.bfloat16, torch.float32, torch.bfloat16)
    assert _half_token_embedding(LoraMethod, fp32)
    assert not _half_token_embedding(LoraMethod, bf16)
    for method in (TiMethod, DreamBoothMethod, FinetuneMethod):
        assert not _half_token_embedding(method, fp32), method.__name__
