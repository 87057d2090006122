"""The text encoder's MLP (`fc2(act(fc1(x)))`) keeps only fc1's output for backward.

transformers' CLIPMLP (SD1's and SD2's text encoders) keeps, per layer, fc1's output, what its
activation keeps (quick_gelu `x * sigmoid(1.702 x)`: the sigmoid's output too) and the
activation's output, which fc2 (its LoRA, or its trained weight) reads for its gradient.
`use_recomputing_mlp(text_encoder)` keeps fc1's output alone: the activation runs through
`Recomputed` (computed again in backward, autograd's own gradient) and fc2's saved input is
rebuilt from fc1's output when backward reads it (models/saved_recompute.py). The forward and
every gradient are bit-identical. SD1 at 77 tokens, batch 1, fp32: 2 of the 3 (77 x 3072) tensors
per layer, 12 layers, 21.7 MiB; more with longer prompts (max_token_length) and larger batches.

Only modules of exactly that class, only while gradients are recorded, not under gradient
checkpointing or torch.compile (models/saved_recompute.py). Training applies it to the text
encoders (run/train.py). SDTRAIN_CLIP_MLP=stock turns it off (A/B).
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch

OPT_OUT = "SDTRAIN_CLIP_MLP"


def _forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """CLIPMLP.forward keeping only fc1's output for backward."""
    from sdtrain.models.saved_recompute import Recomputed, kept_as, ready

    h = self.fc1(hidden_states)
    if not (h.requires_grad and ready(h)):
        return self.fc2(self.activation_fn(h))
    act = self.activation_fn
    product = Recomputed.apply(h, act)
    with kept_as(product, h, act):
        return self.fc2(product)


def use_recomputing_mlp(module: torch.nn.Module) -> int:
    """Route every CLIPMLP of `module` through `_forward`; how many (0 when opted out)."""
    from transformers.models.clip.modeling_clip import CLIPMLP

    if os.environ.get(OPT_OUT, "").strip().lower() == "stock":
        return 0
    count = 0
    for mlp in module.modules():
        if type(mlp) is CLIPMLP:
            mlp.forward = types.MethodType(_forward, mlp)  # type: ignore[method-assign]
            count += 1
    return count
