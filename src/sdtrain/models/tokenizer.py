"""The CLIP tokenizers of SD 1.x / 2.x, built offline from the bundled BPE vocabulary."""

from __future__ import annotations

import functools
import gzip
import logging
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.errors import ModelLoadError
from sdtrain.models.families import FAMILIES, family_spec

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408

# SD1 uses OpenAI's CLIP tokenizer (pad = EOS); SD2's OpenCLIP tokenizer pads with "!" (id 0).
PAD_TOKENS: dict[str, str] = {name: spec.pad_token for name, spec in FAMILIES.items()}

# The hub ids the reference toolkit fetched; `tokenizer_cache_dir` sub-folders are named after them.
REFERENCE_IDS: dict[str, str] = {
    "sd1": "openai/clip-vit-large-patch14",
    "sd2": "stabilityai/stable-diffusion-2",
}

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGE_COUNT = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable unicode table, in CLIP's vocabulary order (256 characters)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Tokens in id order and the merge pairs, read from the bundled BPE file (~0.07 s)."""
    asset = resources.files("sdtrain.models") / "assets" / "clip_bpe" / _BPE_FILE
    try:
        with asset.open("rb") as handle:
            lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    except OSError as error:
        raise ModelLoadError(
            f"the bundled CLIP vocabulary {_BPE_FILE} cannot be read: {error}",
            hint="reinstall sdtrain (the package data is missing or damaged)",
        ) from error
    merges = tuple(tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1])
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise ModelLoadError(
            f"the bundled CLIP vocabulary has {len(tokens)} tokens, expected {VOCAB_SIZE}",
            hint="reinstall sdtrain (the package data is damaged)",
        )
    return tuple(tokens), merges  # type: ignore[return-value]


def build_tokenizer(family: str) -> CLIPTokenizer:
    """A fresh 49,408-token CLIPTokenizer for `family` ("sd1" / "sd2") from the bundled vocabulary.

    Identical ids to `openai/clip-vit-large-patch14` (sd1) and `stabilityai/stable-diffusion-2`'s
    tokenizer (sd2); they differ only in the pad token. Each call returns a new object, so a method
    may add tokens (Textual Inversion) without affecting others.
    """
    from transformers import CLIPTokenizer

    family_spec(family)
    tokens, merges = _vocab_and_merges()
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        pad_token=PAD_TOKENS[family],
        model_max_length=MODEL_MAX_LENGTH,
    )


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def _load_saved(folder: Path, family: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"the tokenizer in {folder} cannot be loaded: {error}",
            hint="delete that folder (it is rebuilt from the bundled vocabulary) or point "
            "tokenizer_cache_dir elsewhere",
        ) from error
    expected_pad = PAD_TOKENS[family]
    if tokenizer.pad_token != expected_pad:
        log.warning(
            "tokenizer in %s pads with %r; %s models are trained with %r",
            folder,
            tokenizer.pad_token,
            family,
            expected_pad,
        )
    return tokenizer


def _save_folder(tokenizer: CLIPTokenizer, target: Path) -> None:
    """Write the tokenizer files to a temp folder beside `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(target)
    except OSError as error:
        log.warning("could not save the tokenizer to %s: %s", target, error)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(family: str, cache_dir: str | None = None) -> CLIPTokenizer:
    """The tokenizer for `family`, offline.

    Without `cache_dir` it is built in memory from the bundled vocabulary. With `cache_dir`
    (the reference's `--tokenizer_cache_dir`), a saved tokenizer is used when `cache_dir` holds one
    or when `cache_dir/<hub id with "/" -> "_">` does (e.g. `openai_clip-vit-large-patch14`);
    otherwise the bundled tokenizer is built and saved there for the next run, as the reference did
    after downloading it.
    """
    family_spec(family)
    if cache_dir is None:
        return build_tokenizer(family)
    root = Path(cache_dir).expanduser()
    named = root / REFERENCE_IDS[family].replace("/", "_")
    for folder in (named, root):
        if _has_tokenizer_files(folder):
            log.debug("using the saved tokenizer in %s", folder)
            return _load_saved(folder, family)
    tokenizer = build_tokenizer(family)
    _save_folder(tokenizer, named)
    return tokenizer
