"""BLIP captioning through transformers (BlipForConditionalGeneration + BlipProcessor)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.atomic import write_text
from sdtrain.errors import ConfigError, ModelLoadError, Problem
from sdtrain.tools.caption.common import (
    CaptionSummary,
    default_workers,
    list_images,
    load_rgb,
    output_path,
    run_batches,
    split_existing,
)

LOGGER = logging.getLogger(__name__)

# The BLIP-large captioner, the same weights as the reference's model_large_caption.pth.
DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
# The reference decoder's text prompt; it is removed from every caption.
DEFAULT_PROMPT = "a picture of "


@dataclass(frozen=True)
class BlipOptions:
    """Every option of a BLIP captioning run (names and defaults as the reference's flags)."""

    batch_size: int = 1
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5
    seed: int = 42
    prompt: str = DEFAULT_PROMPT
    caption_extension: str = ".caption"
    recursive: bool = False
    overwrite: bool = False
    workers: int = field(default_factory=default_workers)
    device: str = "auto"

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for `generate`, as the reference's BLIP decoder sets them.

        Beam search: `num_beams`, no sampling, repetition penalty 1.0. Nucleus sampling (the
        default): `top_p`, repetition penalty 1.1, one beam. Lengths count the prompt tokens.
        """
        common = {"max_length": self.max_length, "min_length": self.min_length}
        if self.beam_search:
            return {
                **common,
                "do_sample": False,
                "num_beams": self.num_beams,
                "repetition_penalty": 1.0,
            }
        return {
            **common,
            "do_sample": True,
            "top_p": self.top_p,
            "num_beams": 1,
            "repetition_penalty": 1.1,
        }

    def check(self) -> None:
        """Raise ConfigError for values generation cannot use."""
        problems = []
        if self.batch_size < 1:
            problems.append(Problem("batch_size", "must be at least 1"))
        if self.num_beams < 1:
            problems.append(Problem("num_beams", "must be at least 1"))
        if not 0 < self.top_p <= 1:
            problems.append(Problem("top_p", "must be in (0, 1]"))
        if self.min_length > self.max_length:
            problems.append(Problem("min_length", f"is above max_length ({self.max_length})"))
        if problems:
            for problem in problems:
                problem.file = "<command line>"
            raise ConfigError(problems)


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else is used as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_blip(model: str, device: str) -> tuple[Any, Any]:
    """(model in eval mode on `device`, processor) from a local folder or a hub id.

    A hub id is read from the Hugging Face cache when offline (`HF_HUB_OFFLINE=1`); online,
    transformers downloads it once into that cache.
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(model)
        network = BlipForConditionalGeneration.from_pretrained(model)
    except Exception as error:
        raise ModelLoadError(
            f"cannot load the BLIP captioner '{model}': {error}",
            hint=f"pass --model <folder or hub id>; to fetch {DEFAULT_MODEL} once, run this "
            "command online (without HF_HUB_OFFLINE)",
        ) from error
    return network.eval().to(device), processor


def strip_prompt(caption: str, prompt: str) -> str:
    """The caption without the leading prompt text (the reference cuts `len(prompt)` chars)."""
    caption, prompt = caption.strip(), prompt.strip()
    if prompt and caption.lower().startswith(prompt.lower()):
        caption = caption[len(prompt) :]
    return caption.strip()


def caption_folders(folders: Sequence[Path], model: str, options: BlipOptions) -> CaptionSummary:
    """Caption every image in `folders`, writing `<stem><caption_extension>` beside each.

    Existing caption files are kept (counted as skipped) unless `options.overwrite`. Images are
    decoded and preprocessed by background threads while the model runs on batches; an image
    that cannot be read is reported in the summary and the run goes on. Sampling is seeded once
    with `options.seed`, so a rerun over the same files gives the same captions.
    """
    import numpy as np
    import torch

    options.check()
    images = list_images(folders, options.recursive)
    todo, skipped = split_existing(images, options.caption_extension, not options.overwrite)
    summary = CaptionSummary(skipped=skipped)
    if not todo:
        return summary
    device = resolve_device(options.device)
    network, processor = load_blip(model, device)
    prompt_ids = processor.tokenizer(options.prompt, return_tensors="pt").input_ids.to(device)
    prompt_text = processor.tokenizer.decode(prompt_ids[0], skip_special_tokens=True)
    LOGGER.info("BLIP captioner %s on %s, prompt '%s'", model, device, prompt_text)
    torch.manual_seed(options.seed)
    kwargs = options.generate_kwargs()

    def decode(path: Path) -> np.ndarray:
        pixels = processor.image_processor(images=load_rgb(path), return_tensors="np")
        return pixels["pixel_values"][0]  # (3, H, W) float32, resized and normalised

    def infer(batch: list[np.ndarray]) -> list[str]:
        pixel_values = torch.from_numpy(np.stack(batch)).to(device)
        input_ids = prompt_ids.repeat(len(batch), 1)
        with torch.inference_mode():
            tokens = network.generate(pixel_values=pixel_values, input_ids=input_ids, **kwargs)
        texts = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [strip_prompt(text, prompt_text) for text in texts]

    def write(image: Path, caption: str) -> None:
        write_text(output_path(image, options.caption_extension), caption + "\n")
        LOGGER.debug("%s: %s", image, caption)

    run_batches(
        todo,
        decode,
        infer,
        write,
        batch_size=options.batch_size,
        workers=options.workers,
        description="captioning",
        summary=summary,
    )
    return summary
