"""Sample images during training: when (§10.1), with the live weights, without touching training.

Training randomness is derived per step (sdtrain.seeds), and generation restores every global
RNG it could touch, so a run with sampling trains bit-identically to one without.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.config.sections import SampleSection

if TYPE_CHECKING:
    from sdtrain.config.prompt_file import PromptSpec
    from sdtrain.engine.metrics import Trackers
    from sdtrain.methods.base import Method
    from sdtrain.models.bundle import ModelBundle

logger = logging.getLogger(__name__)


def expand_spec(spec: PromptSpec, names: dict[str, list[str]]) -> PromptSpec:
    """A prompt with every embedding token T expanded to "T T1 ..." (negative prompt too)."""
    from dataclasses import replace

    from sdtrain.models.embeddings import expand_all

    if not names:
        return spec
    return replace(
        spec,
        prompt=expand_all(spec.prompt, names),
        negative_prompt=expand_all(spec.negative_prompt, names),
    )


def load_prompts(section: SampleSection, resolution: int) -> list[PromptSpec]:
    """The sample prompts (default size: the family's native resolution), read at start-up so a
    bad prompt file fails before training, not at the first sample point."""
    from sdtrain.config.prompt_file import PromptDefaults, read_prompt_file

    if not section.sample_prompts:
        return []
    defaults = PromptDefaults(width=resolution, height=resolution, sampler=section.sample_sampler)
    return read_prompt_file(section.sample_prompts, defaults)


class SampleHook:
    """Callable the loop invokes at "first", "step", "epoch" and "final" points."""

    def __init__(
        self,
        section: SampleSection,
        prompts: list[PromptSpec],
        bundle: ModelBundle,
        method: Method,
        output_dir: Path,
        output_name: str | None,
        clip_skip: int | None,
        max_token_length: int | None,
        dtype: object,
        trackers: Trackers | None = None,
    ) -> None:
        self.section, self.prompts, self.bundle, self.method = section, prompts, bundle, method
        self.output_dir, self.output_name = Path(output_dir), output_name
        self.clip_skip, self.max_token_length, self.dtype = clip_skip, max_token_length, dtype
        self.trackers = trackers
        self.written: list[Path] = []

    def due(self, kind: str, epoch: int, step: int) -> bool:
        """Whether the reference schedule samples at this point."""
        s = self.section
        if not self.prompts:
            return False
        if kind == "first":
            return s.sample_at_first
        if kind == "epoch":
            return bool(s.sample_every_n_epochs) and epoch % s.sample_every_n_epochs == 0
        if kind == "step":
            return (
                not s.sample_every_n_epochs
                and bool(s.sample_every_n_steps)
                and step % s.sample_every_n_steps == 0
            )
        return kind == "final" and not self._sampled_at(step)

    def _sampled_at(self, step: int) -> bool:
        return getattr(self, "_last_step", None) == step

    def __call__(self, kind: str, epoch: int, step: int) -> None:
        if not self.due(kind, epoch, step):
            return
        from sdtrain.models.png import sample_num, save_sample_set
        from sdtrain.models.sampling import generate_images

        num = (
            sample_num(epoch=epoch) if kind in ("first", "epoch") else sample_num(global_step=step)
        )
        logger.info("sampling %d prompt(s) at %s", len(self.prompts), num)
        from sdtrain.models.park import resident

        with self.method.sampling(self.bundle), resident(self.bundle.vae):
            results = generate_images(
                self.bundle,
                [expand_spec(spec, self.bundle.embeddings.names) for spec in self.prompts],
                clip_skip=self.clip_skip,
                max_token_length=self.max_token_length,
                dtype=self.dtype,
            )
        # PNG parameters show the prompts as written (embedding tokens not expanded)
        results = [r._replace(spec=o) for r, o in zip(results, self.prompts, strict=True)]
        saved = save_sample_set(
            results,
            self.output_dir,
            self.output_name,
            num,
            model=self.bundle.source.spec,
            clip_skip=self.clip_skip,
        )
        self.written.extend([*saved.images, saved.sheet])
        self._last_step = step
        if self.trackers is not None:
            from PIL import Image

            self.trackers.log_images(
                step,
                {f"sample_{r.spec.index}": r.image for r in results}
                | {"samples": Image.open(saved.sheet)},
            )
