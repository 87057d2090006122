"""Tiny captioning models and images written by the tests (imported by the caption tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# selected_tags.csv rows (name, category) in model output order: 4 ratings, general, character
WD14_TAGS = [
    ("general", "9"),
    ("sensitive", "9"),
    ("questionable", "9"),
    ("explicit", "9"),
    ("red_background", "0"),
    ("blue_sky", "0"),
    ("long_hair", "0"),
    ("^_^", "0"),
    ("white_shirt", "0"),
    ("hatsune_miku_(vocaloid)", "4"),
    ("kagamine_rin", "4"),
]
# score = bias + w . (B, G, R) mean colour in 0..1 (the input is BGR 0..255)
WD14_SCORES = {
    "general": (0.5, (0, 0, 0)),
    "sensitive": (0.0, (0, 0, 0.6)),
    "questionable": (0.1, (0, 0, 0)),
    "explicit": (0.0, (0, 0, 0)),
    "red_background": (0.0, (0, 0, 1)),
    "blue_sky": (0.0, (1, 0, 0)),
    "long_hair": (0.0, (0, 0.5, 0.5)),
    "^_^": (0.0, (0, 1, 0)),
    "white_shirt": (0.0, (1 / 3, 1 / 3, 1 / 3)),
    "hatsune_miku_(vocaloid)": (0.0, (0, 1, 0)),
    "kagamine_rin": (0.4, (0, 0, 0.5)),
}


def expected_scores(rgb: tuple[int, int, int]) -> dict[str, float]:
    """What the tiny tagger gives a uniform square image of colour `rgb`."""
    bgr = np.array(rgb[::-1], dtype=np.float64) / 255
    return {name: bias + float(np.dot(w, bgr)) for name, (bias, w) in WD14_SCORES.items()}


def write_wd14_model(
    folder: Path,
    size: int = 24,
    batch: int | str = "N",
    input_name: str = "input_1:0",
    output_name: str = "predictions_sigmoid",
    nchw: bool = False,
) -> Path:
    """A WD14-layout model: input [batch, S, S, 3] float32 BGR 0..255 -> [batch, n_tags] scores."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    n = len(WD14_TAGS)
    weights = np.zeros((3, n), dtype=np.float32)
    bias = np.zeros((n,), dtype=np.float32)
    for j, (name, _) in enumerate(WD14_TAGS):
        bias[j], weights[:, j] = WD14_SCORES[name][0], WD14_SCORES[name][1]
    dims = [batch, 3, size, size] if nchw else [batch, size, size, 3]
    axes = [2, 3] if nchw else [1, 2]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", [input_name, "scale"], ["scaled"]),
            helper.make_node("ReduceMean", ["scaled"], ["mean"], axes=axes, keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
            helper.make_node("Add", ["logits", "bias"], [output_name]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, n])],
        initializer=[
            numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"]
    rows += [f"{1000 + i},{name},{cat},{10 * i}" for i, (name, cat) in enumerate(WD14_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def write_images(folder: Path, names: dict[str, str], size: tuple[int, int] = (16, 16)) -> Path:
    """Uniform PNG images: {file stem: colour name}."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, colour in names.items():
        Image.new("RGB", size, COLOURS[colour]).save(folder / f"{stem}.png")
    return folder


BLIP_WORDS = [
    "a",
    "picture",
    "of",
    "the",
    "dog",
    "cat",
    "red",
    "green",
    "blue",
    "sitting",
    "on",
    "table",
    "with",
    "small",
    "big",
]
BLIP_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
