"""TiMethod: token setup, init word, weights, XTI conditioning, refusals (tiny SD1 model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtrain.config.methods import TextualInversionSection
from sdtrain.errors import ConfigError
from sdtrain.methods.base import StepInfo
from sdtrain.methods.ti import TiMethod


@pytest.fixture
def bundle():
    from sdtrain.models.builtin import load_builtin

    return load_builtin("builtin:tiny-sd1")


def method(**keys) -> TiMethod:
    return TiMethod(TextualInversionSection(token_string="zqtok", **keys), 1e-3)


class _Batch:
    def __init__(self, captions: list[str]) -> None:
        self.captions = captions


def step() -> StepInfo:
    return StepInfo(0, 1, torch.Generator().manual_seed(0))


def test_new_rows_start_as_the_init_word_rows_bit_for_bit(bundle) -> None:
    base = bundle.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = bundle.tokenizer("xyzzyq", add_special_tokens=False).input_ids
    assert len(ids) == 3
    ti = method(num_vectors_per_token=4, init_word="xyzzyq")
    (group,) = ti.prepare(bundle)
    (rows,) = group.params
    assert rows.dtype == torch.float32 and rows.shape == (4, 32)
    assert torch.equal(rows, base[[ids[0], ids[1], ids[2], ids[0]]].float())
    assert bundle.tokenizer.convert_tokens_to_ids(["zqtok", "zqtok1", "zqtok2", "zqtok3"]) == [
        49408,
        49409,
        49410,
        49411,
    ]
    assert bundle.embeddings.names == {"zqtok": ["zqtok", "zqtok1", "zqtok2", "zqtok3"]}
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    trainable = [n for n, p in bundle.text_encoder.named_parameters() if p.requires_grad]
    assert trainable == ["text_model.embeddings.token_embedding.rows"] or trainable == [
        "embeddings.token_embedding.rows"
    ]


def test_captions_expand_and_condition_uses_the_rows(bundle) -> None:
    ti = method(num_vectors_per_token=2, init_word="cat")
    ti.prepare(bundle)
    cond = ti.condition(bundle, _Batch(["a zqtok", "a cat cat"]), step())
    assert cond.layer_states is None
    # init word "cat" twice: "zqtok zqtok1" encodes exactly like "cat cat"
    assert torch.equal(cond.hidden_states[0], cond.hidden_states[1])


def refused(call) -> tuple[str, str]:
    """(key, message) of the one problem a ConfigError raised by `call()` carries."""
    with pytest.raises(ConfigError) as error:
        call()
    (problem,) = error.value.problems
    return problem.key, problem.message


def test_refusals_name_the_key(bundle, tmp_path: Path) -> None:
    from sdtrain.models.embeddings import write_embedding

    def cat_token() -> None:
        TiMethod(TextualInversionSection(token_string="cat"), 1e-3).prepare(bundle)

    key, message = refused(cat_token)
    assert key == "textual_inversion.token_string" and "cat already exist" in message
    key, message = refused(lambda: method(init_word="   ").prepare(bundle))
    assert key == "textual_inversion.init_word" and "no token in the vocabulary" in message
    key, message = refused(lambda: TiMethod(TextualInversionSection(), 1e-3))
    assert key == "textual_inversion.token_string" and "no token given" in message
    two = write_embedding(tmp_path / "two.safetensors", torch.zeros(2, 32), token="two")
    key, message = refused(lambda: method(weights=str(two)))
    assert key == "textual_inversion.weights" and "holds 2 vector(s)" in message
    wide = write_embedding(tmp_path / "wide.pt", torch.zeros(1, 768), token="wide")
    key, message = refused(lambda: method(weights=str(wide)).prepare(bundle))
    assert key == "textual_inversion.weights" and "width 768" in message
    (tmp_path / "bad.pt").write_bytes(b"junk")
    key, message = refused(lambda: method(weights=str(tmp_path / "bad.pt")))
    assert "cannot read" in message
    for bad in ({"a1111_format": True}, {"xti": True, "save_model_as": "pt"}):
        with pytest.raises(ValueError):
            TextualInversionSection(token_string="zq", **bad)


def test_weights_continue_from_every_form(bundle, tmp_path: Path) -> None:
    from sdtrain.models.embeddings import write_embedding, write_xti

    vectors = torch.randn(2, 32)
    for name, a1111 in (("a.safetensors", False), ("b.pt", False), ("c.pt", True)):
        path = write_embedding(tmp_path / name, vectors, token="x", a1111=a1111)
        ti = method(num_vectors_per_token=2, weights=str(path))
        from sdtrain.models.builtin import load_builtin

        (group,) = ti.prepare(load_builtin("builtin:tiny-sd1"))
        assert torch.equal(group.params[0], vectors)
    from sdtrain.models.xti import site_names

    sites = site_names(bundle.unet)
    assert sites == ["IN01", "MID", "OUT02", "OUT03"]  # tiny-sd1: 4 sites
    layers = {name: torch.randn(2, 32) for name in sites}
    xti_file = write_xti(tmp_path / "x.safetensors", layers, None)
    key, message = refused(lambda: method(num_vectors_per_token=2, weights=str(xti_file)))
    assert "XTI" in message
    (group,) = method(num_vectors_per_token=2, weights=str(xti_file), xti=True).prepare(bundle)
    assert torch.equal(group.params[0], torch.cat([layers[name] for name in sites]))


def test_xti_gives_one_state_per_site(bundle) -> None:
    ti = method(num_vectors_per_token=2, init_word="cat", xti=True)
    (group,) = ti.prepare(bundle)
    rows = group.params[0]
    assert rows.shape == (4 * 2, 32)  # tiny-sd1 has 4 cross-attention sites
    cond = ti.condition(bundle, _Batch(["a zqtok on grass"]), step())
    assert cond.layer_states is not None and len(cond.layer_states) == 4
    # all sites start from the init word: every site's state is the same
    assert all(torch.equal(s, cond.layer_states[0]) for s in cond.layer_states)
    with torch.no_grad():
        rows[2 * 2 : 3 * 2] += torch.randn(2, 32)  # site OUT02 only
    cond = ti.condition(bundle, _Batch(["a zqtok on grass"]), step())
    changed = [not torch.equal(s, cond.layer_states[0]) for s in cond.layer_states]
    assert changed == [False, False, True, False]
    assert torch.equal(cond.hidden_states, cond.layer_states[1])  # MID
    # the family routes the states to the 16 cross-attention sites
    noisy = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    with torch.no_grad():
        pred = bundle.family.predict(bundle.unet, noisy, t, cond)
        from sdtrain.methods.base import Conditioning

        plain = bundle.family.predict(bundle.unet, noisy, t, Conditioning(cond.hidden_states))
    assert not torch.equal(pred, plain)


def test_templates_ignore_captions(bundle) -> None:
    ti = method(use_style_template=True)
    ti.prepare(bundle)
    captions = ti.captions(["anything"], torch.Generator().manual_seed(0))
    assert "in the style of zqtok" in captions[0]


@pytest.mark.parametrize("xti", [False, True])
def test_sampling_uses_the_current_rows(bundle, xti: bool) -> None:
    import numpy as np

    from sdtrain.config.prompt_file import PromptSpec
    from sdtrain.engine.sampling import expand_spec
    from sdtrain.models.sampling import generate_images

    ti = method(num_vectors_per_token=2, init_word="cat", xti=xti)
    (group,) = ti.prepare(bundle)
    spec = PromptSpec(
        prompt="a zqtok", negative_prompt="zqtok", width=64, height=64, steps=2, seed=1
    )
    expanded = expand_spec(spec, bundle.embeddings.names)
    assert (expanded.prompt, expanded.negative_prompt) == ("a zqtok zqtok1", "zqtok zqtok1")

    def image() -> np.ndarray:
        (result,) = generate_images(bundle, [expanded])
        return np.asarray(result.image)

    before = image()
    assert np.array_equal(before, image())
    with torch.no_grad():
        # XTI: the last site's second vector; TI: zqtok1 (a constant shift would vanish in
        # the text encoder's LayerNorm)
        group.params[0][-1] += torch.randn(32, generator=torch.Generator().manual_seed(0)) * 3
    assert not np.array_equal(before, image())


@pytest.mark.parametrize("xti", [False, True])
def test_sd2_trains_and_exports(tmp_path: Path, xti: bool) -> None:
    """SD2 (pad token '!', its own width) through prepare, a backward step and export."""
    from safetensors import safe_open

    from sdtrain.methods.base import Conditioning, SavePoint
    from sdtrain.models.builtin import load_builtin

    sd2 = load_builtin("builtin:tiny-sd2")
    width = sd2.text_encoder.get_input_embeddings().weight.shape[1]
    ti = method(num_vectors_per_token=2, init_word="cat", xti=xti)
    (group,) = ti.prepare(sd2)
    cond = ti.condition(sd2, _Batch(["a zqtok"]), step())
    assert isinstance(cond, Conditioning) and cond.hidden_states.shape[-1] == width
    pred = sd2.family.predict(sd2.unet, torch.randn(1, 4, 8, 8), torch.tensor([10]), cond)
    pred.square().mean().backward()
    assert group.params[0].grad is not None and group.params[0].grad.abs().sum() > 0
    (path,) = ti.export(sd2, SavePoint(tmp_path, "zqtok", 1, 1, True))
    with safe_open(str(path), "pt") as handle:
        arch = handle.metadata()["modelspec.architecture"]
        assert arch.startswith("stable-diffusion-v2") and arch.endswith("/textual-inversion")
        keys = list(handle.keys())
    assert keys == (["IN01", "MID", "OUT02", "OUT03"] if xti else ["emb_params"])


def test_build_names_the_output_after_the_token(caplog) -> None:
    from types import SimpleNamespace

    from sdtrain.methods.ti import build

    config = SimpleNamespace(
        textual_inversion=TextualInversionSection(token_string="zqtok"),
        optimizer=SimpleNamespace(learning_rate=1e-3),
        training=SimpleNamespace(output_name=None, prior_loss_weight=1.0),
        model=SimpleNamespace(clip_skip=None, max_token_length=None),
        saving=SimpleNamespace(save_precision=None),
    )
    image = SimpleNamespace(path="a.png", caption="no token", num_repeats=1)
    plan = SimpleNamespace(datasets=[SimpleNamespace(subsets=[SimpleNamespace(images=[image])])])
    ti = build(config, plan)  # type: ignore[arg-type]
    assert ti.token == "zqtok" and config.training.output_name == "zqtok"
    assert "1 of 1 captions do not contain the token 'zqtok'" in caplog.text
