"""Fixtures of the caption tests: a tiny WD14-shaped ONNX tagger and a tiny random BLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_captioners import BLIP_SPECIAL, BLIP_WORDS, write_wd14_model


@pytest.fixture(scope="session")
def wd14_model(tmp_path_factory) -> Path:
    """A tiny WD14 model folder (input 24 px, dynamic batch)."""
    return write_wd14_model(tmp_path_factory.mktemp("wd14"))


@pytest.fixture(scope="session")
def blip_model(tmp_path_factory) -> Path:
    """A random BLIP captioner (width 32, one layer, 32 px images) with a tiny WordPiece vocab.

    Weights drawn 10x wider than BLIP's default so that captions depend on the image.
    """
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("blip")
    vocab = BLIP_SPECIAL + BLIP_WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
            "initializer_range": 0.2,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": 5,
            "sep_token_id": 3,
            "pad_token_id": 0,
            "encoder_hidden_size": 32,
            "initializer_range": 0.2,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)
    return folder
