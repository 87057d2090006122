"""What a file that is not a base model is (`sdtrain model info`): a LoRA, a Textual Inversion
embedding (TI or XTI), or a training state folder, with the facts users look for."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

# text-encoder width -> family (CLIP ViT-L/14: SD 1.x, OpenCLIP ViT-H/14: SD 2.x)
_WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}


def describe_state(folder: Path) -> dict[str, Any] | None:
    """A `*-state` folder: counters, files, config facts; None when `folder` is no state."""
    from sdtrain.engine.state import COUNTERS, MANIFEST, verify_state

    manifest = folder / MANIFEST
    if not (folder.is_dir() and manifest.is_file()):
        return None
    facts: dict[str, Any] = {"kind": "training state (resumable)"}
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        facts["files"] = ", ".join(sorted(data.get("files", {})))
        counters = json.loads((folder / COUNTERS).read_text(encoding="utf-8"))
        for key in ("global_step", "epoch", "position", "seed"):
            if key in counters:
                facts[key] = counters[key]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        facts["problem"] = f"unreadable: {error}"
    problem = verify_state(folder)
    facts["complete"] = "yes (checksums verify)" if problem is None else f"no: {problem}"
    facts["resume with"] = f"--resume {folder}"
    return facts


def _lora(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> dict[str, Any]:
    downs = {k: s for k, s in shapes.items() if k.endswith(".lora_down.weight")}
    ranks = Counter(s[0] for s in downs.values())
    unet = sum(1 for k in downs if k.startswith("lora_unet_"))
    te = len(downs) - unet
    family = None
    if (
        metadata.get("ss_base_model_version", "").startswith("sd_v2")
        or metadata.get("ss_v2") == "True"
    ):
        family = "sd2"
    elif metadata.get("ss_base_model_version", "").startswith("sd_v1"):
        family = "sd1"
    else:
        widths = {s[1] for k, s in downs.items() if k.startswith("lora_te") and "q_proj" in k}
        family = next((_WIDTH_FAMILY[w] for w in widths if w in _WIDTH_FAMILY), None)
    conv = sum(1 for s in downs.values() if len(s) == 4 and s[2:] != (1, 1))
    facts: dict[str, Any] = {
        "kind": "LoRA (kohya format)",
        "modules": f"{len(downs)} ({unet} U-Net, {te} text encoder"
        + (f", {conv} 3x3 conv" if conv else "")
        + ")",
        "rank": ", ".join(f"{r} ({n} modules)" for r, n in sorted(ranks.items())),
    }
    if family:
        facts["base family"] = family
    for key in ("ss_network_alpha", "ss_network_dim", "ss_network_module", "ss_output_name"):
        if key in metadata:
            facts[key.removeprefix("ss_")] = metadata[key]
    return facts


def _embedding(path: Path) -> dict[str, Any] | None:
    from sdtrain.errors import SdtrainError
    from sdtrain.models.embeddings import is_xti, read_embedding, read_xti

    try:
        if is_xti(path):
            layers = read_xti(path)
            first = next(iter(layers.values()))
            return {
                "kind": "XTI embedding (one vector set per U-Net cross-attention layer)",
                "layers": len(layers),
                "vectors per token": first.shape[0],
                "width": first.shape[1],
                "base family": _WIDTH_FAMILY.get(int(first.shape[1]), "unknown"),
            }
        vectors = read_embedding(path)
    except (SdtrainError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    return {
        "kind": "Textual Inversion embedding",
        "vectors": vectors.shape[0],
        "width": vectors.shape[1],
        "base family": _WIDTH_FAMILY.get(int(vectors.shape[1]), "unknown"),
    }


def describe_file(
    path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]
) -> dict[str, Any] | None:
    """A LoRA or embedding file's description from its keys; None for anything else."""
    if any(k.startswith(("lora_unet_", "lora_te")) for k in shapes):
        return _lora(shapes, metadata)
    embedding_keys = {"emb_params", "string_to_param"}
    if (
        embedding_keys & {k.split(".")[0] for k in shapes}
        or len(shapes) in (1, 16)
        or "MID" in shapes
    ):
        return _embedding(path)
    return None
