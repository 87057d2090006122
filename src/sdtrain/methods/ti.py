"""`sdtrain train ti`: Textual Inversion (§8), and XTI / P+ with `xti = true` (§8.5).

Only the new token rows train. They live in a `NewTokenRows` module in front of the frozen
embedding matrix (sdtrain.models.token_rows), so every other row stays bit-identical by
construction, and the UNet, VAE and text encoder stay frozen in the weights' precision.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.errors import ConfigError, Problem
from sdtrain.methods.base import Conditioning, ParamGroup, SavePoint, StepInfo
from sdtrain.methods.ti_captions import (
    TiCaptions,
    captions_without_token,
    templates_for,
    warn_missing_token,
)
from sdtrain.models.embeddings import token_strings

if TYPE_CHECKING:
    import torch

    from sdtrain.config.methods import TextualInversionSection
    from sdtrain.config.run import RunConfig
    from sdtrain.data.batch import Batch
    from sdtrain.data.plan import Plan
    from sdtrain.models.bundle import ModelBundle
    from sdtrain.models.token_rows import NewTokenRows
    from sdtrain.models.xti import XtiRows

log = logging.getLogger(__name__)
TABLE = "textual_inversion"


def _problem(key: str, message: str, hint: str = "") -> ConfigError:
    return ConfigError([Problem(key=f"{TABLE}.{key}", message=message, hint=hint)])


def _text_pair(bundle: ModelBundle) -> tuple[Any, torch.nn.Module]:
    """The (tokenizer, text encoder) the new tokens live in, through the model family; a
    family with several text encoders (SDXL) is refused by name until TI supports it."""
    family = bundle.family
    encoders = family.text_encoders(bundle)
    names = ", ".join(family.text_encoder_names)
    if len(encoders) != 1:
        raise ConfigError(
            [
                Problem(
                    key="model.pretrained_model_name_or_path",
                    message="Textual Inversion trains one text encoder's embeddings; "
                    f"the {family.name} family has {len(encoders)} ({names})",
                    hint="use an SD 1.x / 2.x base model",
                )
            ]
        )
    return family.tokenizers(bundle)[0], encoders[0]


def build(config: RunConfig, plan: Plan) -> TiMethod:
    """The registry's builder: TiMethod from a validated `sdtrain train ti` config. Warns once
    (with a count) about captions that lack the token, unless templates replace them; an unset
    output_name becomes the token string (reference)."""
    section: TextualInversionSection = config.textual_inversion  # type: ignore[attr-defined]
    method = TiMethod(
        section,
        config.optimizer.learning_rate,
        prior_loss_weight=config.training.prior_loss_weight,
        clip_skip=config.model.clip_skip,
        max_token_length=config.model.max_token_length,
        save_precision=config.saving.save_precision,
    )
    if config.training.output_name is None:
        # the reference's default: the file is named after the token, which is how A1111 and
        # `sdtrain generate --embedding` pick the token up again
        config.training.output_name = method.token
        log.info("output_name defaults to the token: %s", method.token)
    if method.captions.templates is None:
        entries = [
            (str(image.path), image.caption)
            for dataset in plan.datasets
            for subset in dataset.subsets
            for image in subset.images
            if image.num_repeats > 0
        ]
        missing = captions_without_token(entries, method.token)
        warn_missing_token(missing, len(entries), method.token)
    return method


class TiMethod:
    """Trains n new token vectors (TI) or 16 x n (XTI) against a frozen SD1/SD2 model."""

    name = "ti"
    export_needs_vae = False  # an embedding file holds only the vectors (the VAE can be released)
    # frozen parts loaded straight in the compute dtype under mixed precision (nothing reads
    # them in fp32 before the engine casts them: run/train.py `_part_dtypes`)
    compute_dtype_parts = ("unet", "vae")

    def __init__(
        self,
        section: TextualInversionSection,
        learning_rate: float,
        *,
        prior_loss_weight: float = 1.0,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        save_precision: str | None = None,
    ) -> None:
        """Validate the section and read `weights` now (config errors before a model loads)."""
        if not section.token_string:
            raise _problem(
                "token_string", "no token given", 'set token_string = "mytoken" (a new word)'
            )
        self.section = section
        self.token = section.token_string
        self.count = section.num_vectors_per_token
        self.names = token_strings(self.token, self.count)
        self.xti = section.xti
        self.lr = learning_rate
        self.prior_loss_weight = prior_loss_weight
        self.clip_skip, self.max_token_length = clip_skip, max_token_length
        self.save_precision = save_precision
        templates = templates_for(section.use_object_template, section.use_style_template)
        self.captions = TiCaptions(self.token, self.names, templates)
        self._initial = self._read_weights() if section.weights else None
        self.rows: NewTokenRows | None = None
        self.layers: XtiRows | None = None

    def _read_weights(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """(n, D), or an XTI file's site name -> (n, D) (XTI only; a plain file seeds every
        site); row count checked here, width and sites once the model is loaded."""
        from sdtrain.errors import ModelLoadError
        from sdtrain.models.embeddings import is_xti, read_embedding, read_xti

        path = str(self.section.weights)
        try:
            if is_xti(path):
                if not self.xti:
                    raise _problem(
                        "weights", f"{path} is an XTI (per-site) embedding", "set xti = true"
                    )
                vectors: torch.Tensor | dict[str, torch.Tensor] = read_xti(path)
                rows = next(iter(vectors.values())).shape[0]
            else:
                vectors = read_embedding(path)
                rows = vectors.shape[0]
        except ModelLoadError as error:
            raise _problem("weights", error.message, error.hint or "") from error
        if rows != self.count:
            raise _problem(
                "weights",
                f"{path} holds {rows} vector(s) per token, num_vectors_per_token is {self.count}",
                f"set num_vectors_per_token = {rows}",
            )
        return vectors

    # ---------------------------------------------------------------- setup
    def _start_rows(self, tokenizer: Any, base: torch.Tensor) -> torch.Tensor:
        """(n, D) start vectors: init_word's token rows (vector i from token i mod its count),
        bit for bit; without one, the mean of the existing rows (deterministic)."""
        from sdtrain.models.token_rows import word_ids

        word = self.section.init_word
        if word is None:
            return base.float().mean(dim=0, keepdim=True).repeat(self.count, 1)
        ids = word_ids(tokenizer, word)
        if not ids:
            raise _problem(
                "init_word",
                f"init word {word!r} has no token in the vocabulary",
                "use an ordinary word close to the concept (e.g. 'dog', 'pattern')",
            )
        if len(ids) > 1 and len(ids) != self.count:
            log.warning(
                "init word %r is %d tokens, num_vectors_per_token is %d: vector i starts from "
                "token i mod %d",
                word,
                len(ids),
                self.count,
                len(ids),
            )
        return base[[ids[i % len(ids)] for i in range(self.count)]].float()

    def prepare(self, bundle: ModelBundle) -> list[ParamGroup]:
        """Freeze everything, add the tokens with their rows; the rows are the one group."""
        from sdtrain.models.token_rows import install_rows, taken_tokens
        from sdtrain.models.xti import XtiRows, site_names, stack_sites

        tokenizer, encoder = _text_pair(bundle)
        bundle.unet.requires_grad_(False)
        bundle.vae.requires_grad_(False)
        encoder.requires_grad_(False)
        taken = taken_tokens(tokenizer, self.names)
        if taken:
            raise _problem(
                "token_string",
                f"token(s) {', '.join(taken)} already exist in the tokenizer's vocabulary",
                "choose a word the tokenizer does not know (e.g. a made-up one such as 'shs')",
            )
        base = encoder.get_input_embeddings().weight.detach()
        sites = site_names(bundle.unet) if self.xti else []
        initial, self._initial = self._initial, None
        if isinstance(initial, dict):
            try:
                rows = stack_sites(initial, sites)
            except ValueError as error:
                raise _problem("weights", str(error)) from error
        elif initial is not None:
            rows = initial
        else:
            rows = self._start_rows(tokenizer, base)
        if rows.shape[-1] != base.shape[1]:
            raise _problem(
                "weights",
                f"{self.section.weights} has vectors of width {rows.shape[-1]}, "
                f"this model's text encoder {base.shape[1]}",
                "use an embedding trained for this model family (768: SD1, 1024: SD2)",
            )
        if self.xti and rows.ndim == 2:
            rows = rows.unsqueeze(0).repeat(len(sites), 1, 1)
        rows = rows.reshape(-1, base.shape[1])
        first = len(tokenizer)
        self.rows = install_rows(tokenizer, encoder, self.names, rows)
        bundle.embeddings.names[self.token] = self.names  # sample prompts expand T
        if self.xti:
            self.layers = XtiRows(first, self.count, tuple(sites))
            bundle.embeddings.xti = self.layers  # sampling conditions each site on its rows
        return [ParamGroup("textual_inversion", [self.rows.rows], self.lr)]

    def _module(self) -> NewTokenRows:
        if self.rows is None:
            raise RuntimeError("TiMethod.prepare() has not run")
        return self.rows

    # ---------------------------------------------------------------- steps
    def train_text_encoder(self) -> bool:
        """True: the text encoder's output depends on the trained rows."""
        return True

    def condition(self, bundle: ModelBundle, batch: Batch, step: StepInfo) -> Conditioning:
        """The batch's TI captions (templates drawn with the step's generator) encoded with the
        current rows; XTI adds the 16 per-site states."""
        from sdtrain.models.text import encode_tokens, tokenize

        captions = self.captions(batch.captions, step.generator)
        tokenizer, encoder = _text_pair(bundle)
        ids = tokenize(tokenizer, captions, self.max_token_length)
        eos = tokenizer.eos_token_id
        if self.layers is None:
            return Conditioning(encode_tokens(encoder, ids, self.clip_skip, eos_token_id=eos))
        states = self.layers.encode(encoder, ids, self.clip_skip, eos)
        return Conditioning(states[self.layers.mid], layer_states=states)

    def loss_weights(self, batch: Batch) -> torch.Tensor | None:
        """(B,) prior_loss_weight on regularization samples, 1 elsewhere (None when all 1)."""
        import torch

        if self.prior_loss_weight == 1.0:
            return None
        return torch.where(batch.is_reg.bool(), self.prior_loss_weight, 1.0).to(torch.float32)

    # after_step only measures: it may run on a skipped step too (engine/host_sync.py)
    after_step_any_outcome = True

    def after_step(self, bundle: ModelBundle, step: StepInfo) -> dict[str, Any]:
        """Nothing to restore (frozen rows are outside the trained parameter); reports the
        mean norm of the trained vectors (a 0-d tensor: the loop reads it on the host)."""
        return {"ti/mean_norm": self._module().rows.detach().norm(dim=-1).mean()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained rows (R, D), fp32."""
        return {"emb_params": self._module().rows.detach().clone()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore trainable_state() in place (a shape mismatch is a TrainingError)."""
        import torch

        from sdtrain.errors import TrainingError

        rows = self._module().rows
        saved = state.get("emb_params")
        if saved is None or saved.shape != rows.shape:
            got = None if saved is None else tuple(saved.shape)
            raise TrainingError(
                f"the state's embedding is {got}, this run trains {tuple(rows.shape)}",
                hint="resume with the token/num_vectors_per_token/xti settings of that run",
            )
        with torch.no_grad():
            rows.copy_(saved)

    # ---------------------------------------------------------------- output
    def vectors(self) -> torch.Tensor:
        """The embedding as saved: (n, D), or (sites, n, D) for XTI (fp32, detached)."""
        rows = self._module().rows.detach().float().cpu()
        if self.layers is None:
            return rows
        return rows.reshape(self.layers.sites, self.count, -1)

    def export(self, bundle: ModelBundle, point: SavePoint) -> list[Path]:
        """Write `<stem>.<save_model_as>`: emb_params (+ modelspec), .pt, A1111 .pt, or XTI."""
        import time

        import torch

        from sdtrain.models.embeddings import write_embedding, write_xti
        from sdtrain.models.modelspec import as_kind, base_modelspec

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.save_precision or "", torch.float32
        )
        vectors = self.vectors().to(dtype)
        path = Path(point.output_dir) / f"{point.stem}.{self.section.save_model_as}"
        metadata = None
        if path.suffix == ".safetensors":
            now = time.time()
            spec = {k: v for k, v in point.metadata.items() if k.startswith("modelspec.")}
            spec = spec or base_modelspec(bundle.family, now)
            spec.setdefault("modelspec.trigger_phrase", self.token)
            metadata = as_kind(spec, "textual-inversion", "TextualInversion", now)
        if self.layers is not None:
            named = dict(zip(self.layers.names, vectors, strict=True))
            write_xti(path, named, metadata)
        else:
            write_embedding(
                path,
                vectors,
                token=self.token,
                metadata=metadata,
                a1111=self.section.a1111_format,
                step=point.global_step,
            )
        log.info("saved %s", path.name)
        return [path]

    def expand_prompt(self, text: str) -> str:
        """`T` -> "T T1 ..." in a sample or negative prompt."""
        return self.captions.expand(text)

    @contextlib.contextmanager
    def sampling(self, bundle: ModelBundle) -> Iterator[None]:
        """The live text encoder already holds the current rows."""
        yield
