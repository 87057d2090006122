"""`sdtrain generate`: images from a model (+ LoRAs, embeddings) and prompts (thin CLI layer)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Generate images from a model, LoRAs and embeddings.", subcommand_metavar="")

SAMPLER_HELP = (
    "ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver, dpmsolver++, "
    "dpmsingle, ddpm (k_ aliases accepted)."
)


@app.callback(invoke_without_command=True)
def generate(
    model: str = typer.Option(
        ...,
        "--model",
        help="Base model: .safetensors/.ckpt file, diffusers "
        "folder, cached hub id or builtin:<name>.",
        show_default=False,
    ),
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        help="Prompt; inline options like --n/--w/--d work inside the quotes.",
        show_default=False,
    ),
    negative: str = typer.Option(
        "",
        "--negative",
        "--negative-prompt",
        "--negative_prompt",
        help="Negative prompt (for prompts without their own --n).",
    ),
    from_file: Path | None = typer.Option(
        None,
        "--from-file",
        "--from_file",
        help="Prompt file (.txt with inline options, .toml or "
        ".json), the same format as sample_prompts.",
        show_default=False,
    ),
    lora: list[str] = typer.Option(
        [],
        "--lora",
        help="LoRA file[:weight] (kohya or diffusers layout); repeat for several.",
        show_default=False,
    ),
    embedding: list[Path] = typer.Option(
        [],
        "--embedding",
        help="Textual-inversion embedding "
        "(.safetensors or A1111 .pt); its file stem is the token; "
        "repeatable.",
        show_default=False,
    ),
    sampler: str = typer.Option("ddim", "--sampler", help=SAMPLER_HELP),
    steps: int = typer.Option(30, "--steps", min=1, max=1000, help="Denoising steps."),
    cfg: float = typer.Option(7.5, "--cfg", "--scale", help="Classifier-free guidance scale."),
    seed: int | None = typer.Option(
        None,
        "--seed",
        min=0,
        help="Seed of the first image (image k gets seed + k); random when unset.",
        show_default=False,
    ),
    width: int = typer.Option(
        512, "--width", min=8, help="Image width (floored to a multiple of 8, at least 64)."
    ),
    height: int = typer.Option(
        512, "--height", min=8, help="Image height (floored to a multiple of 8, at least 64)."
    ),
    count: int = typer.Option(1, "--count", min=1, help="Images per prompt."),
    batch_size: int = typer.Option(
        1, "--batch-size", "--batch_size", min=1, help="Images denoised together."
    ),
    clip_skip: int | None = typer.Option(
        None,
        "--clip_skip",
        "--clip-skip",
        min=1,
        max=12,
        help="Use the text encoder's hidden state [-N].",
        show_default=False,
    ),
    max_token_length: int | None = typer.Option(
        None,
        "--max_token_length",
        "--max-token-length",
        help="Prompt token budget: 75 (default), 150 or 225.",
        show_default=False,
    ),
    v_parameterization: bool | None = typer.Option(
        None,
        "--v_parameterization/--no-v_parameterization",
        help="Force v-prediction on/off (auto-detected when unset).",
        show_default=False,
    ),
    vae: str | None = typer.Option(
        None, "--vae", help="Replacement VAE file or folder.", show_default=False
    ),
    out: Path = typer.Option(Path("generated"), "--out", help="Output folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    mixed_precision: str = typer.Option(
        "no", "--mixed_precision", "--mixed-precision", help="no, fp16 or bf16 (autocast)."
    ),
) -> None:
    """Generate PNGs (with A1111-style parameters) and a contact sheet into --out."""
    from sdtrain.config.prompt_file import PromptDefaults
    from sdtrain.errors import ConfigError, Problem
    from sdtrain.tools.generate import (
        GenerateOptions,
        generate,
        load_specs,
        parse_lora_ref,
        resolve_device,
    )

    problems = []
    if max_token_length not in (None, 75, 150, 225):
        problems.append(
            Problem(
                key="max_token_length",
                file="<command line>",
                message=f"must be 75, 150 or 225, got {max_token_length}",
            )
        )
    if mixed_precision not in ("no", "fp16", "bf16"):
        problems.append(
            Problem(
                key="mixed_precision",
                file="<command line>",
                message=f"must be no, fp16 or bf16, got {mixed_precision!r}",
            )
        )
    if problems:
        raise ConfigError(problems, hint="see sdtrain generate --help")
    if mixed_precision == "bf16" and resolve_device(device).type == "cpu":
        from sdtrain.engine.cpu_bf16 import refuse_without_kernels

        refuse_without_kernels("mixed_precision", file="<command line>")
    defaults = PromptDefaults(
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        scale=cfg,
        seed=seed,
        sampler=sampler,
    )
    specs = load_specs(prompt, from_file, defaults)
    options = GenerateOptions(
        model=model,
        out=out,
        loras=tuple(parse_lora_ref(item) for item in lora),
        embeddings=tuple(embedding),
        count=count,
        batch_size=batch_size,
        clip_skip=clip_skip,
        max_token_length=max_token_length,
        v_parameterization=v_parameterization,
        vae=vae,  # type: ignore[arg-type]
        device=device,
        mixed_precision=mixed_precision,  # type: ignore[arg-type]
    )
    result = generate(specs, options)
    from sdtrain.log import out as stdout

    for path in [*result.images, result.sheet]:
        stdout.print(str(path), soft_wrap=True, markup=False, highlight=False)
