"""The run TOML's common tables. Key names are the reference toolkit's option names."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sdtrain.config.base import Section, path_field

Interpolation = Literal[
    "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"
]
Resolution = int | list[int]


class ModelSection(Section):
    """[model]: which base model to load and how to run it."""

    pretrained_model_name_or_path: str | None = Field(
        None,
        description="base model: single .safetensors/.ckpt file, diffusers folder, hub id, "
        "or builtin:<name>",
    )
    v2: bool | None = Field(
        None, description="model is SD 2.x (auto-detected from weights when unset)"
    )
    v_parameterization: bool | None = Field(
        None,
        description="v-prediction target (auto-detected from metadata / 768 heuristic when unset)",
    )
    vae: str | None = Field(
        None, description="replacement VAE: VAE file, full checkpoint or diffusers folder"
    )
    clip_skip: int | None = Field(
        None, ge=1, le=12, description="use hidden state [-clip_skip] + final norm"
    )
    max_token_length: Literal[75, 150, 225] | None = Field(
        None, description="caption token budget: 75 (default), 150 or 225 in 75-token chunks"
    )
    attention: Literal["sdpa", "xformers", "mem_eff_attn"] = Field(
        "sdpa",
        description="attention: torch SDPA, xformers (CUDA extra) or SDPA's memory-efficient path",
    )
    xformers: bool = Field(False, description='reference alias for attention = "xformers"')
    mem_eff_attn: bool = Field(False, description='reference alias for attention = "mem_eff_attn"')
    sdpa: bool = Field(False, description='reference alias for attention = "sdpa" (the default)')
    no_half_vae: bool = Field(False, description="keep the VAE in fp32 under mixed precision")
    tokenizer_cache_dir: str | None = path_field(
        None, "folder with a saved tokenizer to use instead of the bundled CLIP vocabulary"
    )

    @model_validator(mode="after")
    def _fold_attention_aliases(self) -> ModelSection:
        chosen = [name for name in ("xformers", "mem_eff_attn") if getattr(self, name)]
        if len(chosen) > 1:
            raise ValueError(
                "xformers and mem_eff_attn cannot both be set; choose one `attention` value"
            )
        if chosen:
            if "attention" in self.model_fields_set and self.attention != chosen[0]:
                raise ValueError(f'attention = "{self.attention}" contradicts {chosen[0]} = true')
            self.attention = chosen[0]  # type: ignore[assignment]
        return self


class DatasetSection(Section):
    """[dataset]: where the images are, plus run-level defaults for every dataset/subset key.

    The values here sit below the blueprint's [general]/[[datasets]]/[[datasets.subsets]] tables in
    the resolution chain, exactly like the reference toolkit's command-line options.
    """

    dataset_config: str | None = path_field(None, "dataset blueprint file (.toml or .json)")
    train_data_dir: str | None = path_field(
        None, "legacy mode: parent of <repeats>_<tokens> folders (or the fine-tune image folder)"
    )
    reg_data_dir: str | None = path_field(None, "legacy mode: parent of <repeats>_<class> folders")
    in_json: str | None = path_field(
        None, "legacy fine-tune mode: metadata JSON for train_data_dir"
    )
    dataset_repeats: int | None = Field(
        None, ge=1, description="repeats of legacy fine-tune subsets"
    )
    skip_invalid_images: bool = Field(
        False, description="train without corrupt/unreadable images instead of refusing to start"
    )
    # dataset-level keys (family D)
    resolution: Resolution | None = Field(None, description="training resolution: N or [W, H]")
    enable_bucket: bool | None = Field(None, description="aspect-ratio bucketing")
    min_bucket_reso: int | None = Field(None, description="smallest bucket side (default 256)")
    max_bucket_reso: int | None = Field(None, description="largest bucket side (default 1024)")
    bucket_reso_steps: int | None = Field(None, description="bucket side granularity (default 64)")
    bucket_no_upscale: bool | None = Field(None, description="per-image buckets, never enlarging")
    network_multiplier: float | None = Field(None, description="LoRA multiplier for this dataset")
    validation_seed: int | None = Field(None, description="seed of the validation split")
    validation_split: float | None = Field(None, ge=0.0, le=1.0, description="held-out fraction")
    resize_interpolation: Interpolation | None = Field(
        None, description="resize filter; default area when shrinking, lanczos when enlarging"
    )
    # subset-level keys (families S, DO, DBA)
    num_repeats: int | None = Field(None, description="times each image is seen per epoch")
    shuffle_caption: bool | None = Field(None, description="shuffle caption tags")
    caption_separator: str | None = Field(None, description='tag separator (default ",")')
    keep_tokens: int | None = Field(None, ge=0, description="leading tags kept in place")
    keep_tokens_separator: str | None = Field(
        None, description="marks the fixed head / tail of a caption"
    )
    secondary_separator: str | None = Field(None, description="grouped-tag separator")
    enable_wildcard: bool | None = Field(
        None, description="{a|b} wildcards and random caption lines"
    )
    caption_prefix: str | None = Field(None, description="text put before every caption")
    caption_suffix: str | None = Field(None, description="text put after every caption")
    color_aug: bool | None = Field(
        None, description="weak hue/gamma augmentation (no latent caching)"
    )
    flip_aug: bool | None = Field(None, description="random horizontal flips")
    face_crop_aug_range: list[float] | None = Field(
        None, description="face-crop scale range [lo, hi]"
    )
    random_crop: bool | None = Field(
        None, description="random instead of centre crop (no latent caching)"
    )
    token_warmup_min: int | None = Field(None, description="tag-count warm-up start")
    token_warmup_step: float | int | None = Field(
        None, description="step (or fraction) ending tag warm-up"
    )
    caption_dropout_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="whole-caption dropout rate"
    )
    caption_dropout_every_n_epochs: int | None = Field(
        None, ge=0, description="drop all captions every N epochs"
    )
    caption_tag_dropout_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="per-tag dropout rate"
    )
    caption_extension: str | None = Field(
        None, description="caption file suffix (default .caption)"
    )
    class_tokens: str | None = Field(
        None, description="caption used for images without a caption file"
    )
    cache_info: bool | None = Field(
        None,
        description="cache sizes + captions in <image_dir>/metadata_cache.json",
    )
    alpha_mask: bool | None = Field(None, description="use the image alpha channel as a loss mask")
    custom_attributes: dict[str, Any] | None = Field(
        None, description="free-form per-subset attributes"
    )


class TrainingSection(Section):
    """[training]: loop length, batch, precision, caching, noise and loss recipe."""

    output_dir: str | None = path_field(None, "folder for models, samples, states and logs")
    output_name: str | None = Field(None, description="file stem of saved models")
    max_train_steps: int = Field(1600, ge=1, description="optimizer steps to train")
    max_train_epochs: int | None = Field(
        None, ge=1, description="epochs to train (wins over max_train_steps)"
    )
    train_batch_size: int = Field(
        1, ge=1, description="images per batch (dataset batch_size default)"
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="batches per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="dtype of frozen weights"
    )
    full_fp16: bool = Field(False, description="train in pure fp16 (needs mixed_precision fp16)")
    full_bf16: bool = Field(False, description="train in pure bf16 (needs mixed_precision bf16)")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory")
    seed: int | None = Field(
        None, description="random seed (a random one is chosen and recorded if unset)"
    )
    cache_latents: bool = Field(False, description="VAE-encode every image once, keep in memory")
    cache_latents_to_disk: bool = Field(False, description="content-addressed latent cache on disk")
    latent_cache_dir: str | None = path_field(
        None, "folder of the content-addressed latent cache (default ~/.cache/sdtrain/latents)"
    )
    vae_batch_size: int = Field(1, ge=1, description="images per VAE encode batch while caching")
    max_data_loader_n_workers: int = Field(
        8, ge=0, description="data-loader worker processes (capped at CPUs)"
    )
    persistent_data_loader_workers: bool = Field(False, description="keep workers between epochs")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping norm (0 disables)")
    prior_loss_weight: float = Field(
        1.0, ge=0.0, description="loss weight of regularization images"
    )
    weighted_captions: bool = Field(False, description="A1111-style (word:1.2) weights in captions")
    noise_offset: float | None = Field(None, description="per-channel noise offset strength")
    noise_offset_random_strength: bool = Field(
        False, description="draw offset strength from U(0, offset)"
    )
    adaptive_noise_scale: float | None = Field(
        None, description="offset grows with |latent mean| (needs noise_offset)"
    )
    multires_noise_iterations: int | None = Field(None, ge=1, description="pyramid noise levels")
    multires_noise_discount: float = Field(0.3, description="pyramid noise level discount")
    ip_noise_gamma: float | None = Field(None, description="input perturbation noise strength")
    ip_noise_gamma_random_strength: bool = Field(False, description="draw gamma from U(0, gamma)")
    zero_terminal_snr: bool = Field(False, description="rescale betas to zero terminal SNR")
    min_timestep: int | None = Field(
        None, ge=0, le=1000, description="lowest training timestep (0)"
    )
    max_timestep: int | None = Field(
        None, ge=0, le=1000, description="timestep upper bound, exclusive (1000)"
    )
    loss_type: Literal["l1", "l2", "huber", "smooth_l1"] = Field("l2", description="element loss")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr", description="huber c schedule"
    )
    huber_c: float = Field(0.1, gt=0.0, description="huber c parameter")
    huber_scale: float = Field(
        1.0, gt=0.0, description="huber c scale, in every schedule (the reference skips snr)"
    )
    min_snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR weighting gamma (5 recommended)"
    )
    scale_v_pred_loss_like_noise_pred: bool = Field(
        False, description="weight v loss like eps loss"
    )
    v_pred_like_loss: float | None = Field(
        None, description="add v-pred-like loss (eps models only)"
    )
    debiased_estimation_loss: bool = Field(False, description="debiased estimation weighting")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="stop after this many consecutive NaN/inf steps (each is skipped)"
    )
    host_sync: Literal["auto", "every_step", "deferred"] = Field(
        "auto",
        description="when the host reads a step's loss and finite check: every_step, or "
        "deferred (one step later, the skip decided on the device: a GPU never waits; needs "
        "torch's fused AdamW/Adam/SGD); auto: deferred on CUDA where possible",
    )
    torch_compile: bool = Field(
        False,
        description="compile the U-Net (and trained text encoders) with torch.compile, one "
        "graph per bucket shape; on a CPU it measured slower than eager (see the README)",
    )
    dynamo_backend: (
        Literal[
            "no",
            "eager",
            "aot_eager",
            "inductor",
            "aot_ts_nvfuser",
            "nvprims_nvfuser",
            "cudagraphs",
            "ofi",
            "fx2trt",
            "onnxrt",
            "tensorrt",
            "ipex",
            "tvm",
        ]
        | None
    ) = Field(
        None,
        description="torch.compile backend with torch_compile (default inductor); "
        '"no" = not compiled; a backend this torch lacks is refused',
    )
    dynamo_mode: (
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None
    ) = Field(
        None,
        description="inductor mode with torch_compile; reduce-overhead = CUDA graphs (CUDA only)",
    )
    validate_every_n_steps: int | None = Field(
        None, ge=1, description="validation loss every N steps (needs validation_split)"
    )
    validate_every_n_epochs: int | None = Field(
        None,
        ge=1,
        description="validation loss every N epochs (default: every epoch with validation_split)",
    )
    max_validation_steps: int | None = Field(
        None, ge=1, description="validation batches per evaluation (default: all)"
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainingSection:
        if self.adaptive_noise_scale is not None and self.noise_offset is None:
            raise ValueError("adaptive_noise_scale needs noise_offset to be set")
        if self.full_fp16 and self.mixed_precision != "fp16":
            raise ValueError('full_fp16 needs mixed_precision = "fp16"')
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ValueError('full_bf16 needs mixed_precision = "bf16"')
        if self.cache_latents_to_disk:
            self.cache_latents = True
        if self.torch_compile and self.dynamo_backend == "no":
            raise ValueError('torch_compile = true contradicts dynamo_backend = "no"')
        if not self.torch_compile:  # the reference's default backend is inert there too
            if self.dynamo_backend not in (None, "no", "inductor"):
                raise ValueError("dynamo_backend applies only with torch_compile = true")
            if self.dynamo_mode not in (None, "default"):
                raise ValueError("dynamo_mode applies only with torch_compile = true")
        if self.dynamo_mode not in (None, "default") and self.compile_backend != "inductor":
            raise ValueError(
                f'dynamo_mode = "{self.dynamo_mode}" is an inductor mode; dynamo_backend is '
                f'"{self.compile_backend}"'
            )
        return self

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend of this run; None: not compiled."""
        if not self.torch_compile:
            return None
        return self.dynamo_backend or "inductor"


class OptimizerSection(Section):
    """[optimizer]: optimizer, learning rates and LR schedule."""

    optimizer_type: str = Field(
        "AdamW", description="AdamW, AdamW8bit, Lion, Prodigy, Adafactor, ... or module.Class"
    )
    learning_rate: float = Field(2e-6, ge=0.0, description="base learning rate")
    unet_lr: float | None = Field(
        None, ge=0.0, description="U-Net learning rate (default learning_rate)"
    )
    text_encoder_lr: float | None = Field(None, ge=0.0, description="text-encoder learning rate")
    optimizer_args: dict[str, Any] | list[str] = Field(
        default_factory=dict,
        description="optimizer kwargs: a table, or reference key=value strings",
    )
    lr_scheduler: str = Field(
        "constant",
        description="linear, cosine, cosine_with_restarts, polynomial, "
        "constant, constant_with_warmup, adafactor",
    )
    lr_scheduler_type: str | None = Field(None, description="custom scheduler class (module.Class)")
    lr_scheduler_args: dict[str, Any] | list[str] = Field(
        default_factory=dict, description="scheduler kwargs: a table, or key=value strings"
    )
    lr_warmup_steps: int | float = Field(
        0, ge=0, description="warm-up steps, or a ratio of total steps if < 1"
    )
    lr_scheduler_num_cycles: int = Field(1, ge=1, description="restarts of cosine_with_restarts")
    lr_scheduler_power: float = Field(1.0, description="polynomial power")
    fused_backward_pass: bool = Field(
        False,
        description="update each weight and free its gradient during backward (optimizers "
        "that update each weight on its own: Adafactor, AdamW, AdamW8bit, Lion, SGDNesterov, ...; "
        "per-weight clipping; no gradient accumulation; one process)",
    )


class SavingSection(Section):
    """[saving]: what is written when, and how to resume."""

    save_precision: Literal["float", "fp16", "bf16"] | None = Field(
        None, description="dtype of saved weights (default: training dtype)"
    )
    save_every_n_epochs: int | None = Field(None, ge=1, description="save a model every N epochs")
    save_every_n_steps: int | None = Field(None, ge=1, description="save a model every N steps")
    save_n_epoch_ratio: int | None = Field(
        None, ge=1, description="save about N times over the run"
    )
    save_last_n_epochs: int | None = Field(
        None, ge=1, description="keep only the newest N epoch models"
    )
    save_last_n_epochs_state: int | None = Field(
        None, ge=1, description="keep only the newest N epoch states"
    )
    save_last_n_steps: int | None = Field(
        None, ge=1, description="keep step models of the last N steps"
    )
    save_last_n_steps_state: int | None = Field(
        None, ge=1, description="keep step states of the last N steps"
    )
    save_state: bool = Field(False, description="write a resumable state with every model save")
    save_state_on_train_end: bool = Field(False, description="write a resumable state at the end")
    resume: str | None = path_field(None, 'state folder to continue from, or "auto"')
    resume_allow_changes: list[str] = Field(
        default_factory=list,
        description='config keys (table.key, or "*") allowed to differ from the resumed state',
    )
    metadata_full_paths: bool = Field(
        False,
        description="keep absolute local paths in saved files' metadata (default: base names)",
    )
    metadata_title: str | None = Field(None, description="modelspec.title (default output_name)")
    metadata_author: str | None = Field(None, description="modelspec.author")
    metadata_description: str | None = Field(None, description="modelspec.description")
    metadata_license: str | None = Field(None, description="modelspec.license")
    metadata_tags: str | None = Field(None, description="modelspec.tags")
    metadata_trigger_phrase: str | None = Field(None, description="modelspec.trigger_phrase")


SamplerName = Literal[
    "ddim",
    "pndm",
    "lms",
    "k_lms",
    "euler",
    "k_euler",
    "euler_a",
    "k_euler_a",
    "heun",
    "dpm_2",
    "k_dpm_2",
    "dpm_2_a",
    "k_dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "ddpm",
]


class SampleSection(Section):
    """[sample]: sample images while training."""

    sample_prompts: str | None = path_field(None, "prompt file (.txt, .toml or .json)")
    sample_every_n_steps: int | None = Field(None, ge=1, description="sample every N steps")
    sample_every_n_epochs: int | None = Field(
        None, ge=1, description="sample every N epochs (wins over steps)"
    )
    sample_at_first: bool = Field(False, description="sample before training starts")
    sample_sampler: SamplerName = Field("ddim", description="sampler for sample images")


class LoggingSection(Section):
    """[logging]: trackers. Metrics always go to <output_dir>/metrics.jsonl as well."""

    logging_dir: str | None = path_field(None, "TensorBoard/wandb log folder")
    log_prefix: str | None = Field(None, description="prefix of the timestamped log sub-folder")
    log_with: Literal["tensorboard", "wandb", "all"] | None = Field(None, description="tracker(s)")
    log_tracker_name: str | None = Field(None, description="tracker project name")
    wandb_run_name: str | None = Field(None, description="wandb run name")
