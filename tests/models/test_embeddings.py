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
