"""`sdtrain generate`: load a model (+ LoRAs, embeddings), sample prompts, write PNGs + sheet."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sdtrain.config.prompt_file import (
    PromptDefaults,
    PromptSpec,
    prompt_from_text,
    read_prompt_file,
)

if TYPE_CHECKING:
    import torch

    from sdtrain.models.bundle import ModelBundle
    from sdtrain.models.sampling import GeneratedImage

logger = logging.getLogger(__name__)

Precision = Literal["no", "fp16", "bf16"]


@dataclass(frozen=True)
class LoraRef:
    """A LoRA file and the weight (multiplier) to apply it at."""

    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class GenerateOptions:
    """Everything `sdtrain generate` needs besides the prompts."""

    model: str
    out: Path
    loras: tuple[LoraRef, ...] = ()
    embeddings: tuple[Path, ...] = ()
    count: int = 1  # images per prompt (seeds seed, seed+1, ...)
    batch_size: int = 1
    clip_skip: int | None = None
    max_token_length: Literal[75, 150, 225] | None = None
    v_parameterization: bool | None = None
    vae: str | None = None
    device: str = "auto"
    mixed_precision: Precision = "no"


@dataclass
class GenerateResult:
    """What a generate run wrote."""

    images: list[Path]
    sheet: Path


def parse_lora_ref(text: str) -> LoraRef:
    """`FILE` or `FILE:weight` (the last `:` followed by a number is the weight)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return LoraRef(Path(head), float(tail))
        except ValueError:
            pass
    return LoraRef(Path(text), 1.0)


def load_specs(
    prompt: str | None, from_file: Path | None, defaults: PromptDefaults
) -> list[PromptSpec]:
    """Prompts from `--prompt` (inline options allowed) or a prompt file (.txt/.toml/.json)."""
    from sdtrain.errors import ConfigError, Problem

    if (prompt is None) == (from_file is None):
        raise ConfigError(
            [Problem(key="prompt", message="give exactly one of --prompt or --from-file")],
            hint='sdtrain generate --model builtin:tiny-sd1 --prompt "a cat"',
        )
    if from_file is not None:
        return read_prompt_file(from_file, defaults)
    return [prompt_from_text(prompt or "", defaults, where="--prompt")]


def expand_count(specs: list[PromptSpec], count: int) -> list[PromptSpec]:
    """Each spec `count` times; a seeded spec's copies get seed, seed+1, ... (others: random)."""
    out = []
    for spec in specs:
        for k in range(count):
            out.append(spec if spec.seed is None else replace(spec, seed=spec.seed + k))
    return out


def resolve_device(device: str) -> torch.device:
    """`auto` = CUDA when available, else CPU; anything else is passed to torch.device."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(options: GenerateOptions) -> tuple[ModelBundle, dict[str, list[str]]]:
    """The bundle for `options.model` with embeddings added and LoRAs applied (in that order).

    Also returns each embedding's token -> the token strings it added (T, T1, ...).
    """
    from sdtrain.import_gc import quiet_gc

    with quiet_gc():  # torch and diffusers come with these (import_gc.py)
        from sdtrain.config.sections import ModelSection
        from sdtrain.methods.adapters.apply import apply_lora_file
        from sdtrain.models.embeddings import (
            add_embedding,
            add_xti_embedding,
            is_xti,
            read_embedding,
            read_xti,
        )
        from sdtrain.models.load import import_model_stack, load_bundle
        from sdtrain.tools.lora_files import kohya_file_for

    section = ModelSection(
        pretrained_model_name_or_path=options.model,
        v_parameterization=options.v_parameterization,
        vae=options.vae,
        clip_skip=options.clip_skip,
        max_token_length=options.max_token_length,
    )
    with quiet_gc():  # the rest of the model stack, once the options are valid
        import_model_stack()
    bundle = load_bundle(section)
    tokens: dict[str, list[str]] = {}
    # plain embeddings first: they grow the embedding matrix, XTI rows sit in front of it
    for path in sorted(options.embeddings, key=is_xti):
        if is_xti(path):
            names = add_xti_embedding(bundle, Path(path).stem, read_xti(path))
        else:
            names = add_embedding(bundle, Path(path).stem, read_embedding(path))
        tokens[Path(path).stem] = names
        logger.info(
            "embedding %s: %d vector(s) as %s", Path(path).name, len(names), " ".join(names)
        )
    with tempfile.TemporaryDirectory(prefix="sdtrain-lora-") as workdir:
        for i, ref in enumerate(options.loras):
            apply_lora_file(
                bundle,
                kohya_file_for(ref.path, Path(workdir)),
                ref.weight,
                adapter_name=f"generate_{i}",
            )
    return bundle, tokens


def apply_embedding_tokens(
    specs: list[PromptSpec], tokens: dict[str, list[str]]
) -> list[PromptSpec]:
    """Expand each embedding token T to "T T1 ..." in prompts and negative prompts."""
    from sdtrain.models.embeddings import expand_tokens

    out = []
    for spec in specs:
        prompt, negative = spec.prompt, spec.negative_prompt
        for token, names in tokens.items():
            prompt = expand_tokens(prompt, token, names)
            negative = expand_tokens(negative, token, names)
        out.append(replace(spec, prompt=prompt, negative_prompt=negative))
    return out


def _unique(path: Path) -> Path:
    """`path`, or `path` with -1, -2, ... before the suffix when it exists (never overwrite)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_outputs(
    results: list[GeneratedImage],
    out: Path,
    model_name: str,
    clip_skip: int | None,
    extras: dict[str, str],
    stamp: str,
) -> GenerateResult:
    """`<out>/<stamp>_<prompt:02d>_<image:03d>_<seed>.png` each, plus `<out>/<stamp>_sheet.png`."""
    from sdtrain.models.png import SheetItem, contact_sheet, format_parameters, save_png

    paths, items, per_prompt = [], [], {}
    for result in results:
        k = per_prompt.get(result.spec.index, 0)
        per_prompt[result.spec.index] = k + 1
        name = f"{stamp}_{result.spec.index:02d}_{k:03d}_{result.seed}.png"
        text = format_parameters(result.spec, result.seed, model_name, clip_skip, extras)
        paths.append(save_png(_unique(out / name), result.image, text))
        items.append(
            SheetItem(
                result.image, f"#{result.spec.index} seed {result.seed}: {result.spec.prompt}"
            )
        )
    sheet = save_png(_unique(out / f"{stamp}_sheet.png"), contact_sheet(items, title=model_name))
    return GenerateResult(images=paths, sheet=sheet)


def generate(specs: list[PromptSpec], options: GenerateOptions) -> GenerateResult:
    """Load the model, generate every spec `count` times, write PNGs + contact sheet to `out`."""
    import torch

    from sdtrain.log import progress
    from sdtrain.models.png import timestamp
    from sdtrain.models.sampling import generate_images

    bundle, tokens = load_model(options)
    originals = expand_count(specs, options.count)
    device = resolve_device(options.device)
    for module in (bundle.unet, bundle.vae, *bundle.family.text_encoders(bundle)):
        module.to(device)
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[options.mixed_precision]
    with progress() as bar:
        task = bar.add_task("generating", total=len(originals), info="")
        results = generate_images(
            bundle,
            apply_embedding_tokens(originals, tokens),
            clip_skip=options.clip_skip,
            max_token_length=options.max_token_length,
            device=device,
            dtype=dtype,
            batch_size=options.batch_size,
            progress=lambda item: bar.update(task, advance=1, info=f"seed {item.seed}"),
        )
    # parameters show the prompts as written (embedding tokens not expanded), like A1111
    results = [r._replace(spec=o) for r, o in zip(results, originals, strict=True)]
    extras = {"LoRA": ", ".join(f"{ref.path.name}:{ref.weight:g}" for ref in options.loras)}
    if options.embeddings:
        extras["Embeddings"] = ", ".join(Path(p).name for p in options.embeddings)
    model_name = (
        Path(options.model).name if not options.model.startswith("builtin:") else options.model
    )
    result = write_outputs(
        results,
        Path(options.out),
        model_name,
        options.clip_skip,
        {k: v for k, v in extras.items() if v},
        timestamp(),
    )
    logger.info("wrote %d image(s) and %s", len(result.images), result.sheet)
    return result
