"""`sdtrain caption blip` end to end with a tiny random BLIP saved to a folder."""

from __future__ import annotations

import pytest
from tiny_captioners import write_images

from sdtrain.errors import ConfigError, ModelLoadError
from sdtrain.tools.caption.blip import BlipOptions, strip_prompt


def flat(text: str) -> str:
    """Terminal output without whitespace (rich wraps long log lines at the console width)."""
    return "".join(text.split())


@pytest.fixture
def images(tmp_path):
    folder = write_images(tmp_path / "images", {"a": "red", "b": "green", "c": "blue"}, (40, 24))
    (folder / "d.png").write_bytes(b"garbage")
    return folder


def _captions(folder):
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.caption"))}


def _reference_beam_captions(model_dir, folder, stems, num_beams, max_length, min_length):
    """What transformers itself gives for each image, without sdtrain's pipeline."""
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    captions = {}
    for stem in stems:
        image = Image.open(folder / f"{stem}.png").convert("RGB")
        inputs = processor(images=image, text="a picture of ", return_tensors="pt")
        with torch.inference_mode():
            tokens = model.generate(
                **inputs,
                num_beams=num_beams,
                max_length=max_length,
                min_length=min_length,
                do_sample=False,
            )
        text = processor.tokenizer.decode(tokens[0], skip_special_tokens=True)
        assert text.startswith("a picture of")
        captions[stem] = text[len("a picture of") :].strip() + "\n"
    return captions


def test_beam_search_matches_transformers_and_ignores_the_seed(cli, images, blip_model):
    args = [
        "caption",
        "blip",
        str(images),
        "--model",
        str(blip_model),
        "--beam_search",
        "--num_beams",
        "2",
        "--max_length",
        "10",
        "--min_length",
        "6",
        "--batch_size",
        "2",
    ]
    result = cli([*args, "--seed", "1"])
    assert result.exit_code == 1  # d.png failed: a partial run is not a success
    first = _captions(images)
    assert set(first) == {"a", "b", "c"}
    assert len(set(first.values())) == 3  # the tiny model's captions depend on the image
    assert flat("written 3, skipped 0, failed 1") in flat(result.output)
    assert flat("d.png") in flat(result.output)
    assert first == _reference_beam_captions(blip_model, images, "abc", 2, 10, 6)
    cli([*args, "--seed", "2", "--overwrite"])
    assert _captions(images) == first


def test_sampling_is_reproducible_with_the_seed(cli, images, blip_model):
    args = [
        "caption",
        "blip",
        str(images),
        "--model",
        str(blip_model),
        "--max_length",
        "12",
        "--batch-size",
        "3",
        "--workers",
        "2",
        "--top_p",
        "0.8",
    ]
    cli(args)
    first = _captions(images)
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in first.values())
    assert not any(text.startswith("a picture of") for text in first.values())
    cli([*args, "--overwrite", "--max_data_loader_n_workers", "0"])
    assert _captions(images) == first


def test_existing_captions_are_kept(cli, images, blip_model):
    (images / "a.caption").write_text("mine\n", encoding="utf-8")
    result = cli(
        [
            "caption",
            "blip",
            str(images),
            "--model",
            str(blip_model),
            "--caption_extension",
            ".caption",
            "--max_length",
            "8",
        ]
    )
    assert (images / "a.caption").read_text(encoding="utf-8") == "mine\n"
    assert (images / "b.caption").exists()
    assert flat("written 2, skipped 1, failed 1") in flat(result.output)
    assert result.exit_code == 1 and flat("1 of 4 image(s) failed") in flat(result.output)


def test_unknown_model_is_a_model_error(cli, images, tmp_path):
    with pytest.raises(ModelLoadError) as info:
        cli(["caption", "blip", str(images), "--model", str(tmp_path / "missing")])
    assert "--model" in info.value.hint


def test_strip_prompt():
    assert strip_prompt("a picture of a dog ", "a picture of ") == "a dog"
    assert strip_prompt("A Picture of cats", "a picture of") == "cats"
    assert strip_prompt("two cats", "a picture of ") == "two cats"
    assert strip_prompt("two cats", "") == "two cats"


def test_options_generation_arguments_and_checks():
    sampling = BlipOptions().generate_kwargs()
    assert sampling == {
        "max_length": 75,
        "min_length": 5,
        "do_sample": True,
        "top_p": 0.9,
        "num_beams": 1,
        "repetition_penalty": 1.1,
    }
    beams = BlipOptions(beam_search=True, num_beams=3).generate_kwargs()
    assert beams["num_beams"] == 3 and beams["do_sample"] is False
    assert beams["repetition_penalty"] == 1.0
    with pytest.raises(ConfigError) as info:
        BlipOptions(min_length=10, max_length=5, top_p=0).check()
    assert {p.key for p in info.value.problems} == {"min_length", "top_p"}
