"""Streaming safetensors weights into meta-built modules: the same model as the library's load."""

from __future__ import annotations

import json

import pytest
import torch

from sdtrain.models import diffusers_folder
from sdtrain.models.stream import read_safetensors_header, stream_into


def _library(monkeypatch, folder, name, dtype):
    with monkeypatch.context() as patch:
        patch.setattr(diffusers_folder, "_stream_component", lambda *_a, **_k: None)
        return diffusers_folder._load_component(folder, name, dtype)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16])
def test_streamed_components_equal_the_library_load(tiny_files, monkeypatch, dtype):
    folder = tiny_files["sd1"]["diffusers"]
    for name in diffusers_folder.COMPONENTS:
        streamed = diffusers_folder._stream_component(folder / name, name, dtype)
        assert streamed is not None, name
        library = _library(monkeypatch, folder, name, dtype)
        a, b = streamed.state_dict(), library.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)
        assert not any(t.is_meta for t in a.values())
        assert streamed.training is False
        assert [p.requires_grad for p in streamed.parameters()] == [
            p.requires_grad for p in library.parameters()
        ]
        config_a = streamed.config.to_dict() if name == "text_encoder" else dict(streamed.config)
        config_b = library.config.to_dict() if name == "text_encoder" else dict(library.config)
        assert config_a == config_b, name


def test_text_encoder_output_is_identical(tiny_files, monkeypatch):
    folder = tiny_files["sd1"]["diffusers"]
    streamed = diffusers_folder._stream_component(folder / "text_encoder", "text_encoder", None)
    library = _library(monkeypatch, folder, "text_encoder", None)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).last_hidden_state, library(ids).last_hidden_state)


def test_incomplete_file_falls_back_to_the_library(tmp_path):
    from safetensors.torch import save_file

    layer = torch.nn.Linear(3, 2)
    save_file({"weight": layer.weight.detach()}, str(tmp_path / "w.safetensors"))
    with torch.device("meta"):
        empty = torch.nn.Linear(3, 2)
    assert stream_into(empty, [tmp_path / "w.safetensors"]) == ["bias"]


def test_header_and_casts(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(4, 5, dtype=torch.float16),
        "b": torch.arange(6, dtype=torch.int64),
        "c": torch.randn(3, dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    entries, metadata = read_safetensors_header(path)
    assert metadata == {"k": "v"}
    assert {k: (e.dtype, e.shape) for k, e in entries.items()} == {
        k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()
    }

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.empty(4, 5))
            self.c = torch.nn.Parameter(torch.empty(3))
            self.register_buffer("b", torch.zeros(6, dtype=torch.int64))

    holder = Holder()
    assert stream_into(holder, [path], torch.float32) == []
    assert holder.a.dtype == torch.float32 and torch.equal(holder.a, tensors["a"].float())
    assert torch.equal(holder.c, tensors["c"].float())
    assert holder.b.dtype == torch.int64 and torch.equal(holder.b, tensors["b"])


def test_shape_mismatch_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, str(tmp_path / "w.safetensors")
    )
    with pytest.raises(ValueError, match="weight"):
        stream_into(torch.nn.Linear(3, 2), [tmp_path / "w.safetensors"])


def test_sharded_index(tmp_path, tiny_files):
    """A sharded folder (index + shards) streams too."""
    from safetensors.torch import load_file, save_file

    source = tiny_files["sd1"]["diffusers"] / "vae"
    sub = tmp_path / "vae"
    sub.mkdir()
    (sub / "config.json").write_text((source / "config.json").read_text())
    state = load_file(str(source / "diffusion_pytorch_model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"s-1.safetensors": keys[:half], "s-2.safetensors": keys[half:]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(sub / shard))
    index = {"weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (sub / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = diffusers_folder._stream_component(sub, "vae", None)
    assert model is not None
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_casts_through_one_staging_buffer_give_independent_equal_tensors(tmp_path):
    from safetensors.torch import save_file

    from sdtrain.models.stream import Staging, read_tensor

    tensors = {  # small, large (the buffer grows), small again (reused), bf16 in between
        "s": torch.randn(3, 4, dtype=torch.float16),
        "l": torch.randn(50, 70, dtype=torch.float16),
        "b": torch.randn(9, dtype=torch.bfloat16),
        "t": torch.randn(2, dtype=torch.float16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    entries, _ = read_safetensors_header(path)
    staging = Staging()
    with open(path, "rb", buffering=0) as handle:
        out = {k: read_tensor(handle, entries[k], torch.float32, staging) for k in tensors}
    assert staging.buffer.numel() == 50 * 70 * 2
    staging.buffer.fill_(0)  # nothing read aliases the buffer
    for key, value in tensors.items():
        assert out[key].dtype == torch.float32 and torch.equal(out[key], value.to(torch.float32))
