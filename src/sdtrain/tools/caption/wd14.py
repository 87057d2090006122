"""WD14 tagging with onnxruntime: model lookup, the tagger's preprocessing, and the tagging run."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdtrain.atomic import write_text
from sdtrain.errors import ConfigError, MissingExtraError, ModelLoadError, Problem
from sdtrain.tools.caption.common import (
    CaptionSummary,
    default_workers,
    list_images,
    load_rgb,
    output_path,
    run_batches,
    split_existing,
)
from sdtrain.tools.caption.tags import (
    RatingPlacement,
    TagSelection,
    TagVocabulary,
    append_tags,
    parse_replacements,
    prepare_names,
    read_selected_tags,
    select_tags,
    split_tag_list,
)

LOGGER = logging.getLogger(__name__)

DEFAULT_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"  # the reference's default
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"


def resolve_model(model: str) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) of a local folder, or of a hub repo id.

    A repo id is taken from the Hugging Face cache, or downloaded into it when online
    (`HF_HUB_OFFLINE=1` forbids the download). v3 taggers (e.g. SmilingWolf/wd-swinv2-tagger-v3)
    have the same two files and work the same way.
    """
    folder = Path(model).expanduser()
    if folder.is_dir():
        files = folder / MODEL_FILE, folder / TAGS_FILE
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(
                f"{folder} lacks {' and '.join(missing)}",
                hint=f"a WD14 model folder holds {MODEL_FILE} and {TAGS_FILE}",
            )
        return files
    if folder.exists() or model.count("/") != 1:
        raise ModelLoadError(
            f"'{model}' is neither a model folder nor a hub repo id (owner/name)",
            hint=f"pass a folder with {MODEL_FILE} + {TAGS_FILE}, or e.g. {DEFAULT_REPO}",
        )
    from huggingface_hub import constants, hf_hub_download

    try:
        onnx_path = Path(hf_hub_download(model, MODEL_FILE))
        return onnx_path, Path(hf_hub_download(model, TAGS_FILE))
    except Exception as error:
        if constants.HF_HUB_OFFLINE:
            hint = "it is not in the local cache: run once online (unset HF_HUB_OFFLINE)"
        else:
            hint = "check the repo id and the connection"
        raise ModelLoadError(
            f"cannot get {model} from the Hugging Face hub or its cache: {error}",
            hint=f"{hint}, or pass a local folder with {MODEL_FILE} + {TAGS_FILE}",
        ) from error


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """The tagger's input for one RGB image: (size, size, 3) float32 BGR in 0..255.

    Padded to a centred square with white, then resized to `size` (area averaging when shrinking,
    Lanczos when enlarging, as the reference). Transparency was composited onto white by
    `load_rgb` (the reference drops the alpha channel instead).
    """
    width, height = image.size
    side = max(width, height)
    if (width, height) != (side, side):
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    if side != size:
        resample = Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS
        image = image.resize((size, size), resample)
    return np.asarray(image, dtype=np.float32)[:, :, ::-1].copy()


class OnnxTagger:
    """A WD14 ONNX model: input name, size and batch read from the graph, never assumed."""

    def __init__(self, onnx_path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise MissingExtraError("WD14 tagging", "wd14", "onnxruntime") from error
        available = ort.get_available_providers()
        preferred = ["CUDAExecutionProvider", "ROCMExecutionProvider"]
        providers = [p for p in preferred if p in available] + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=providers)
        except Exception as error:
            raise ModelLoadError(
                f"onnxruntime cannot load {onnx_path}: {error}", hint="re-download the model"
            ) from error
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape)
        if (
            len(shape) != 4
            or shape[3] != 3
            or not isinstance(shape[1], int)
            or shape[1] != shape[2]
        ):
            raise ModelLoadError(
                f"{onnx_path.name} takes input {shape}; WD14 taggers take [batch, S, S, 3] (NHWC)",
                hint="use a SmilingWolf-style WD14 ONNX tagger",
            )
        self.path = onnx_path
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        self.size: int = shape[1]
        self.fixed_batch: int | None = (
            shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        )
        width = outputs[0].shape[-1] if outputs[0].shape else None
        self.num_outputs: int | None = width if isinstance(width, int) else None
        self.providers: list[str] = self.session.get_providers()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """images: (N, S, S, 3) float32 BGR 0..255 -> probabilities (N, n_tags).

        With a fixed batch size in the graph, a short last batch is padded and the padding's
        outputs dropped (the reference crashes on it).
        """
        count = len(images)
        if self.fixed_batch is not None and count < self.fixed_batch:
            pad = np.zeros((self.fixed_batch - count, *images.shape[1:]), dtype=images.dtype)
            images = np.concatenate([images, pad])
        probs = self.session.run([self.output_name], {self.input_name: images})[0]
        return np.asarray(probs)[:count]


@dataclass(frozen=True)
class Wd14Options:
    """Every option of a WD14 tagging run (names as the reference's flags)."""

    thresh: float = 0.35
    general_threshold: float | None = None
    character_threshold: float | None = None
    batch_size: int = 1
    workers: int = field(default_factory=default_workers)
    caption_extension: str = ".txt"
    caption_separator: str = ", "
    remove_underscore: bool = False
    character_tag_expand: bool = False
    undesired_tags: str = ""
    tag_replacement: str | None = None
    character_tags_first: bool = False
    always_first_tags: str | None = None
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    append_tags: bool = False
    recursive: bool = False
    overwrite: bool = False

    def selection(self) -> TagSelection:
        """The tag-selection rules these options describe (thresholds default to `thresh`)."""
        rating: RatingPlacement = "none"
        if self.use_rating_tags:  # the reference lets --use_rating_tags win when both are given
            rating = "first"
        elif self.use_rating_tags_as_last_tag:
            rating = "last"
        general = self.thresh if self.general_threshold is None else self.general_threshold
        character = self.thresh if self.character_threshold is None else self.character_threshold
        return TagSelection(
            general_threshold=general,
            character_threshold=character,
            undesired=frozenset(split_tag_list(self.undesired_tags, self.caption_separator)),
            character_tags_first=self.character_tags_first,
            rating=rating,
            always_first=tuple(split_tag_list(self.always_first_tags, self.caption_separator)),
        )


@dataclass
class TaggingResult:
    """The summary of a tagging run plus how often each written tag occurred."""

    summary: CaptionSummary
    frequency: Counter[str]
    model: dict[str, Any]


def load_tagger(model: str, options: Wd14Options) -> tuple[OnnxTagger, TagVocabulary, int]:
    """(tagger, rewritten tag names, batch size) for a run; a fixed batch in the graph wins."""
    replacements = parse_replacements(options.tag_replacement)
    onnx_path, tags_path = resolve_model(model)
    tagger = OnnxTagger(onnx_path)
    vocabulary = prepare_names(
        read_selected_tags(tags_path),
        separator=options.caption_separator,
        character_tag_expand=options.character_tag_expand,
        remove_underscore=options.remove_underscore,
        replacements=replacements,
    )
    if tagger.num_outputs is not None and tagger.num_outputs != len(vocabulary):
        raise ModelLoadError(
            f"{onnx_path.name} gives {tagger.num_outputs} scores but {tags_path.name} lists "
            f"{len(vocabulary)} tags",
            hint="the model and its selected_tags.csv do not belong together",
        )
    batch_size = options.batch_size
    if tagger.fixed_batch is not None and tagger.fixed_batch != batch_size:
        LOGGER.warning("the model has a fixed batch size of %d; using it", tagger.fixed_batch)
        batch_size = tagger.fixed_batch
    providers = ", ".join(tagger.providers)
    LOGGER.info(
        "WD14 tagger %s: input %d px, %d tags, %s",
        onnx_path,
        tagger.size,
        len(vocabulary),
        providers,
    )
    return tagger, vocabulary, batch_size


def tag_folders(folders: Sequence[Path], model: str, options: Wd14Options) -> TaggingResult:
    """Tag every image in `folders` and write `<stem><caption_extension>` beside each.

    Existing tag files are kept (counted as skipped) unless `overwrite`; with `append_tags` they
    are extended with the new tags instead (existing tags first). Unreadable images are reported
    in the summary and never stop the run.
    """
    if options.batch_size < 1:
        raise ConfigError([Problem("batch_size", "must be at least 1", file="<command line>")])
    selection = options.selection()
    parse_replacements(options.tag_replacement)  # a malformed value fails before any work
    images = list_images(folders, options.recursive)
    keep = not options.overwrite and not options.append_tags
    todo, skipped = split_existing(images, options.caption_extension, keep_existing=keep)
    summary = CaptionSummary(skipped=skipped)
    frequency: Counter[str] = Counter()
    if not todo:
        return TaggingResult(summary=summary, frequency=frequency, model={})
    tagger, vocabulary, batch_size = load_tagger(model, options)

    def infer(batch: list[np.ndarray]) -> list[list[str]]:
        tags = [select_tags(p.tolist(), vocabulary, selection) for p in tagger(np.stack(batch))]
        for found in tags:
            frequency.update(found)  # what the model found, as the reference counts it
        return tags

    def write(image: Path, tags: list[str]) -> None:  # runs in a writer thread
        target = output_path(image, options.caption_extension)
        if options.append_tags and target.exists():
            tags = append_tags(target.read_text(encoding="utf-8"), tags, options.caption_separator)
        write_text(target, options.caption_separator.join(tags) + "\n")
        LOGGER.debug("%s: %s", image, options.caption_separator.join(tags))

    run_batches(
        todo,
        lambda path: preprocess(load_rgb(path), tagger.size),
        infer,
        write,
        batch_size=batch_size,
        workers=options.workers,
        description="tagging",
        summary=summary,
    )
    info = {
        "path": str(tagger.path),
        "size": tagger.size,
        "batch_size": batch_size,
        "tags": len(vocabulary),
    }
    return TaggingResult(summary=summary, frequency=frequency, model=info)
