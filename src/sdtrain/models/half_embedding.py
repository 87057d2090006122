"""A frozen token embedding held in half precision in fp32 runs: gather the rows, then up-cast.

A CLIP text encoder's token embedding is one (vocab, D) matrix, 49408 x 768 for SD1: 0.14 GiB
in fp32, of which a step reads the rows of its captions' 77-token windows. An fp32 run up-casts
a float16/bf16 model file's weights at load (models/load.py); `keep_token_embedding_half`
puts this matrix back in the half dtype whose values it came from, when every value makes
that round trip exactly, and up-casts only the gathered rows: gather then up-cast equals
up-cast then gather, bit for bit. SD1.5's float16 folder, fp32 LoRA at 256 px
(benchmarks/bench_train.py): peak RSS 5031-5036 -> 4968-4971 MiB.

The half matrix is a buffer, not a parameter: it cannot train, and the rest of the engine sees
the text encoder as before, all parameters fp32 (`text_encoder.dtype`, read by diffusers'
pipelines, and engine/halfweights.py's `has_frozen_half`, which would otherwise switch on the
slower per-layer up-cast mode for the whole model). Only for methods whose text encoder's token
embedding never changes (`half_token_embedding_ok`, methods/lora.py), in fp32 training without
autocast (run/train.py). SDTRAIN_TOKEN_EMBEDDING=fp32 turns it off (A/B).
"""

from __future__ import annotations

import os

import torch

OPT_OUT = "SDTRAIN_TOKEN_EMBEDDING"
_ROWS = 4096  # rows compared at a time: no second full-size fp32 copy for the check


class HalfTokenEmbedding(torch.nn.Module):
    """Token ids -> fp32 rows of a float16/bf16 `weight` buffer (frozen, never a parameter).

    `weight`, `num_embeddings` and `embedding_dim` read as on torch.nn.Embedding (`weight` in
    its stored half dtype); the buffer keeps the state-dict key `weight`.
    """

    # engine/precision.py `apply_precision` leaves this module's buffers in their dtype
    sdtrain_fixed_dtype = True
    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (...) int -> (..., D) float32."""
        return torch.nn.functional.embedding(input_ids, self.weight).float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.weight.dtype}"


def exact_half(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (fp32) as float16, or else bf16, when every value survives the round trip
    exactly (a half model file's values); None when neither holds all of them."""
    for dtype in (torch.float16, torch.bfloat16):
        half = weight.detach().to(dtype)
        if all(
            torch.equal(half[i : i + _ROWS].float(), weight[i : i + _ROWS])
            for i in range(0, weight.shape[0], _ROWS)
        ):
            return half
    return None


def keep_token_embedding_half(text_encoder: torch.nn.Module) -> bool:
    """Replace the text encoder's fp32 token embedding by a HalfTokenEmbedding holding the same
    values, when they are exact in float16 or bf16. Returns whether it did.

    Left as it is: opted out (SDTRAIN_TOKEN_EMBEDDING=fp32), an embedding that is not a plain
    fp32 torch.nn.Embedding (already half, max_norm renormalising rows in place, TI's own
    embedding modules), or values that would change in half precision (an fp32 model file).
    The caller vouches that nothing trains or rewrites the embedding (methods/lora.py).
    """
    if os.environ.get(OPT_OUT, "").strip().lower() == "fp32":
        return False
    embedding = text_encoder.get_input_embeddings()  # type: ignore[operator]
    if (
        type(embedding) is not torch.nn.Embedding
        or embedding.weight.dtype != torch.float32
        or embedding.max_norm is not None
    ):
        return False
    half = exact_half(embedding.weight)
    if half is None:
        return False
    text_encoder.set_input_embeddings(HalfTokenEmbedding(half))  # type: ignore[operator]
    return True
