"""Method tables of the run TOML: one per `sdtrain train <method>` subcommand."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sdtrain.config.base import Section, path_field


class NetworkSection(Section):
    """[network]: the LoRA adapter trained by `sdtrain train lora`."""

    network_module: Literal["networks.lora", "lora"] = Field(
        "networks.lora",
        description="adapter kind; LoRA-LierLa, or C3Lier with conv_dim in network_args",
    )
    network_dim: int | None = Field(None, ge=1, description="LoRA rank (default 4)")
    network_alpha: float = Field(1.0, ge=0.0, description="LoRA alpha; 0 means alpha = dim")
    network_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="dropout on the down projection"
    )
    network_args: dict[str, Any] | list[str] = Field(
        default_factory=dict, description="conv_dim, conv_alpha, ...: a table, or key=value strings"
    )
    network_weights: str | None = path_field(None, "continue from this kohya LoRA file")
    dim_from_weights: bool = Field(False, description="take dims/alphas from network_weights")
    network_weights_partial: bool = Field(
        False,
        description="allow network_weights to match this network only in part (default: any "
        "missing or unmatched module is an error)",
    )
    network_train_unet_only: bool = Field(False, description="train only the U-Net adapter")
    network_train_text_encoder_only: bool = Field(
        False, description="train only the text-encoder adapter"
    )
    save_model_as: Literal["safetensors", "ckpt", "pt"] = Field(
        "safetensors", description="LoRA file type"
    )
    save_diffusers_lora: bool = Field(
        False,
        description="also write a diffusers/PEFT-layout LoRA file (alpha kept in its metadata)",
    )
    no_metadata: bool = Field(False, description="write only the minimal ss_* metadata")
    training_comment: str | None = Field(None, description="stored as ss_training_comment")
    scale_weight_norms: float | None = Field(
        None, gt=0.0, description="max-norm regularisation of each delta W"
    )

    @model_validator(mode="after")
    def _exclusive_targets(self) -> NetworkSection:
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise ValueError(
                "network_train_unet_only and network_train_text_encoder_only exclude each other"
            )
        if self.dim_from_weights and not self.network_weights:
            raise ValueError("dim_from_weights needs network_weights")
        return self


class TextualInversionSection(Section):
    """[textual_inversion]: the embedding trained by `sdtrain train ti` (TI, or XTI / P+)."""

    token_string: str | None = Field(
        None, description="the new token T (required); n vectors add T, T1, ..., T(n-1)"
    )
    num_vectors_per_token: int = Field(1, ge=1, le=75, description="vectors (tokens) for T")
    init_word: str | None = Field(
        None, description="initialise vector i from this word's token i mod its token count"
    )
    weights: str | None = path_field(
        None, "continue from this embedding (.safetensors / .pt / A1111 / XTI file)"
    )
    use_object_template: bool = Field(
        False, description="ignore captions: random 'a photo of a T' style templates"
    )
    use_style_template: bool = Field(
        False, description="ignore captions: random 'a painting in the style of T' templates"
    )
    xti: bool = Field(
        False, description="XTI (P+): one embedding per UNet cross-attention site (16)"
    )
    save_model_as: Literal["safetensors", "pt", "ckpt"] = Field(
        "safetensors", description="embedding file type (XTI: safetensors only)"
    )
    a1111_format: bool = Field(
        False, description="write .pt/.ckpt in AUTOMATIC1111's string_to_param form"
    )

    @model_validator(mode="after")
    def _file_forms(self) -> TextualInversionSection:
        if self.token_string is not None and not self.token_string.strip():
            raise ValueError("token_string is empty")
        if self.token_string is not None and any(c.isspace() for c in self.token_string):
            raise ValueError(f"token_string {self.token_string!r} contains whitespace")
        if self.a1111_format and self.save_model_as == "safetensors":
            raise ValueError('a1111_format is a .pt form: set save_model_as = "pt"')
        if self.xti and (self.save_model_as != "safetensors" or self.a1111_format):
            raise ValueError("xti embeddings are written as safetensors only")
        return self


SaveModelAs = Literal["ckpt", "safetensors", "diffusers", "diffusers_safetensors"]


class FullModelSection(Section):
    """Keys shared by the full-model methods (`train dreambooth`, `train finetune`)."""

    learning_rate_te: float | None = Field(
        None, ge=0.0, description="text-encoder learning rate (default: optimizer.learning_rate)"
    )
    save_model_as: SaveModelAs | None = Field(
        None,
        description="ckpt, safetensors, diffusers or diffusers_safetensors (default: ckpt for a "
        "single-file source, diffusers otherwise; safetensors variants with use_safetensors)",
    )
    use_safetensors: bool = Field(
        False, description="with save_model_as unset: .safetensors / safe diffusers weights"
    )
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="keep EMA weights with this decay (e.g. 0.9999)"
    )
    ema_on_cpu: bool = Field(True, description="keep the EMA weights in CPU memory")
    ema_save: Literal["beside", "deliverable"] = Field(
        "beside",
        description="beside: also write <name>-ema; deliverable: the saved model is the EMA",
    )


class DreamBoothSection(FullModelSection):
    """[dreambooth]: `sdtrain train dreambooth` (the reference's train_db)."""

    train_text_encoder: bool = Field(True, description="train the text encoder too")
    stop_text_encoder_training: int | None = Field(
        None,
        ge=-1,
        description="freeze the text encoder from this optimizer step on (-1: never train it)",
    )
    no_token_padding: bool = Field(
        False, description="reference option with no effect there; refused when true"
    )
    class_prompt: str | None = Field(
        None, description="prompt of generated class (regularization) images"
    )
    class_data_dir: str | None = path_field(
        None, "folder of the class images (a regularization subset's image_dir)"
    )
    num_class_images: int | None = Field(
        None, ge=1, description="fill class_data_dir up to this many generated class images"
    )
    class_sample_steps: int = Field(30, ge=1, description="sampler steps per class image")
    class_guidance_scale: float = Field(7.5, ge=0.0, description="CFG scale of class images")
    class_sampler: str = Field("ddim", description="sampler of class images")
    class_resolution: int | None = Field(
        None, ge=8, description="class image side (default: the model's resolution)"
    )
    class_seed: int = Field(0, description="seed of class image i is derived from (seed, i)")

    @field_validator("no_token_padding")
    @classmethod
    def _no_token_padding(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "no_token_padding has no effect in the reference toolkit (nothing reads it) and "
                "sdtrain does not emulate it; remove it (captions are padded to 77 tokens)"
            )
        return value

    @field_validator("num_class_images")
    @classmethod
    def _class_images(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            if not info.data.get("class_prompt"):
                raise ValueError("num_class_images needs class_prompt (what to generate)")
            if not info.data.get("class_data_dir"):
                raise ValueError(
                    "num_class_images needs class_data_dir (the regularization image folder)"
                )
        return value

    @model_validator(mode="after")
    def _te_flag(self) -> DreamBoothSection:
        if self.stop_text_encoder_training == -1:
            self.train_text_encoder = False
        return self


class FinetuneSection(FullModelSection):
    """[finetune]: `sdtrain train finetune` (the reference's fine_tune)."""

    train_text_encoder: bool = Field(False, description="train the text encoder too")


# table name -> the subcommand it belongs to (every method the product will have; a table is
# registered with its section class in sdtrain.methods.registry)
METHOD_TABLES: dict[str, str] = {
    "network": "lora",
    "dreambooth": "dreambooth",
    "finetune": "finetune",
    "textual_inversion": "ti",
}


def train_command_exists(method: str) -> bool:
    """True when `sdtrain train <method>` is registered, so hints never name a missing command.

    Reads the registry's names only (sdtrain.methods.registry imports nothing heavy).
    """
    from sdtrain.methods.registry import METHODS

    return method in METHODS
