"""WD14 model handling: preprocessing, graph-driven input layout, model lookup, missing extra."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image
from tiny_captioners import WD14_TAGS, expected_scores, write_wd14_model

from sdtrain.errors import MissingExtraError, ModelLoadError
from sdtrain.tools.caption.wd14 import OnnxTagger, preprocess, resolve_model


def test_preprocess_pads_centred_white_and_gives_bgr():
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    array = preprocess(image, 4)
    assert array.shape == (4, 4, 3) and array.dtype == np.float32
    assert array[0].tolist() == [[255.0, 255.0, 255.0]] * 4  # padding row (top)
    assert array[3].tolist() == [[255.0, 255.0, 255.0]] * 4  # padding row (bottom)
    assert array[1].tolist() == [[0.0, 0.0, 255.0]] * 4  # red in BGR


def test_preprocess_resizes_to_the_model_size():
    assert preprocess(Image.new("RGB", (50, 30), (0, 255, 0)), 24).shape == (24, 24, 3)
    small = preprocess(Image.new("RGB", (3, 3), (0, 0, 255)), 9)
    assert small.shape == (9, 9, 3) and np.allclose(small[4, 4], [255, 0, 0], atol=1)


def test_tagger_reads_input_layout_from_the_graph(tmp_path):
    folder = write_wd14_model(tmp_path, size=20, batch="batch", input_name="in", output_name="p")
    tagger = OnnxTagger(folder / "model.onnx")
    assert (tagger.size, tagger.input_name, tagger.output_name) == (20, "in", "p")
    assert tagger.fixed_batch is None and tagger.num_outputs == len(WD14_TAGS)
    red = preprocess(Image.new("RGB", (20, 20), (255, 0, 0)), 20)
    probs = tagger(red[None])
    want = expected_scores((255, 0, 0))
    assert probs.shape == (1, len(WD14_TAGS))
    assert np.allclose(probs[0], [want[name] for name, _ in WD14_TAGS], atol=1e-5)


def test_fixed_batch_pads_the_last_batch(tmp_path):
    tagger = OnnxTagger(write_wd14_model(tmp_path, size=8, batch=4) / "model.onnx")
    assert tagger.fixed_batch == 4
    assert tagger(np.zeros((3, 8, 8, 3), dtype=np.float32)).shape == (3, len(WD14_TAGS))


def test_nchw_model_is_refused(tmp_path):
    folder = write_wd14_model(tmp_path, size=8, nchw=True)
    with pytest.raises(ModelLoadError, match="NHWC"):
        OnnxTagger(folder / "model.onnx")


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError) as info:
        OnnxTagger(tmp_path / "model.onnx")
    assert "sdtrain[wd14]" in info.value.hint


def test_resolve_model_folder(tmp_path, wd14_model):
    assert resolve_model(str(wd14_model)) == (
        wd14_model / "model.onnx",
        wd14_model / "selected_tags.csv",
    )
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="selected_tags.csv"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither"):
        resolve_model(str(tmp_path / "no" / "such" / "dir"))


def test_resolve_model_from_the_hub_cache_offline(tmp_path, wd14_model, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--SmilingWolf--wd-tiny-tagger-v3" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("model.onnx", "selected_tags.csv"):
        (snapshot / name).write_bytes((wd14_model / name).read_bytes())
    refs = cache / "models--SmilingWolf--wd-tiny-tagger-v3" / "refs"
    refs.mkdir()
    (refs / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    onnx_path, tags_path = resolve_model("SmilingWolf/wd-tiny-tagger-v3")
    assert onnx_path.read_bytes() == (wd14_model / "model.onnx").read_bytes()
    assert tags_path.name == "selected_tags.csv"
    with pytest.raises(ModelLoadError, match="not-in-the-cache") as info:
        resolve_model("SmilingWolf/not-in-the-cache")
    assert "HF_HUB_OFFLINE" in info.value.hint
