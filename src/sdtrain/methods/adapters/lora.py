"""LoRA adapters (networks.lora: LierLa / C3Lier) on a U-Net and text encoder, through peft."""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdtrain.methods.adapters.blocks import block_index
from sdtrain.methods.adapters.spec import LoraSpec
from sdtrain.methods.adapters.targets import Root, Target, find_targets
from sdtrain.methods.base import ParamGroup

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ADAPTER_NAME = "sdtrain"


@dataclass
class LoraModule:
    """One injected peft LoRA layer seen through kohya's eyes (down = lora_A, up = lora_B)."""

    target: Target
    layer: Any  # peft.tuners.lora.LoraLayer
    adapter: str

    @property
    def down(self) -> torch.nn.Module:
        return self.layer.lora_A[self.adapter]

    @property
    def up(self) -> torch.nn.Module:
        return self.layer.lora_B[self.adapter]

    @property
    def rank(self) -> int:
        return int(self.layer.r[self.adapter])

    @property
    def alpha(self) -> float:
        return float(self.layer.lora_alpha[self.adapter])

    def set_alpha(self, alpha: float, multiplier: float = 1.0) -> None:
        """Set alpha and the live scale (multiplier * alpha / rank, no rsLoRA)."""
        self.layer.lora_alpha[self.adapter] = float(alpha)
        self.layer.scaling[self.adapter] = multiplier * float(alpha) / self.rank


def inject(
    model: torch.nn.Module, root: Root, spec: LoraSpec, adapter: str = ADAPTER_NAME
) -> tuple[list[LoraModule], Any]:
    """Wrap the layers of `model` chosen by `spec` with a peft LoRA adapter; return them + config.

    Ranks/alphas that differ from the most common pair go to peft's rank_pattern/alpha_pattern
    (escaped full paths, so each matches exactly one layer). Init is peft's default, which is
    the reference's: kaiming-uniform(a=sqrt 5) down, zero up. The U-Net goes through diffusers'
    add_adapter (keeps its adapter bookkeeping); the text encoder through peft directly.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = find_targets(model, root, with_conv=spec.with_conv and root == "unet")
    ranked = [(t, r) for t in targets if (r := spec.rank_for(t)) is not None]
    if not ranked:
        return [], None
    dim, alpha = Counter(r for _, r in ranked).most_common(1)[0][0]
    config = LoraConfig(
        r=dim,
        lora_alpha=alpha,
        target_modules=[t.path for t, _ in ranked],
        rank_pattern={re.escape(t.path): r for t, (r, _) in ranked if r != dim},
        alpha_pattern={re.escape(t.path): a for t, (_, a) in ranked if a != alpha},
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
        use_rslora=False,
    )
    with _fp32_while_injecting([model.get_submodule(t.path) for t, _ in ranked]):
        if root == "unet" and hasattr(model, "add_adapter"):
            model.add_adapter(config, adapter_name=adapter)
        else:
            inject_adapter_in_model(config, model, adapter_name=adapter)
    modules = [LoraModule(t, model.get_submodule(t.path), adapter) for t, _ in ranked]
    from sdtrain.methods.adapters.inplace import use_inplace_sum

    use_inplace_sum([m.layer for m in modules])  # peft's sum, fewer heap holes
    for module, (_, (r, a)) in zip(modules, ranked, strict=True):
        if module.rank != r or module.alpha != a:
            raise RuntimeError(
                f"peft gave {module.target.path} rank {module.rank}/alpha "
                f"{module.alpha}, expected {r}/{a}"
            )
    return modules, config


@contextlib.contextmanager
def _fp32_while_injecting(layers: list[torch.nn.Module]) -> Iterator[None]:
    """Target layers whose weight is float16/bf16 (a base loaded in its compute dtype) hold it
    up-cast to fp32 while peft injects: peft creates, initialises and then casts each adapter
    to its base layer's dtype, so a half base would round the kaiming init. Afterwards the
    weights go back to their dtype, bit for bit (half -> fp32 -> half is exact)."""
    import torch

    half = (torch.float16, torch.bfloat16)
    restore = [(layer, layer.weight.dtype) for layer in layers if layer.weight.dtype in half]
    for layer, _ in restore:
        layer.weight.data = layer.weight.data.float()
    try:
        yield
    finally:
        for layer, dtype in restore:
            layer.weight.data = layer.weight.data.to(dtype)


def delta_weight(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ΔW = up·down (unscaled) in the base layer's weight shape (§7.3).

    down: (r, in) | (r, in, kh, kw); up: (out, r) | (out, r, 1, 1) -> (out, in[, kh, kw]).
    """
    import torch

    if down.dim() == 2:
        return up @ down
    if down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


class LoraNetwork:
    """The injected LoRA modules of one adapter on a text encoder and/or U-Net."""

    def __init__(
        self,
        modules: list[LoraModule],
        spec: LoraSpec,
        configs: dict[Root, Any],
        adapter: str = ADAPTER_NAME,
    ) -> None:
        self.modules = modules
        self.spec = spec
        self.configs = configs
        self.adapter = adapter
        self._hooks: list[Any] = []
        self.multiplier = 1.0

    def set_multiplier(self, multiplier: float) -> None:
        """Scale every module's output by `multiplier` (the reference's network multiplier):
        peft's live scaling becomes multiplier * alpha / rank; the saved alpha stays."""
        if multiplier == self.multiplier:
            return
        for module in self.modules:
            module.set_alpha(module.alpha, multiplier)
        self.multiplier = multiplier

    @classmethod
    def create(
        cls,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        spec: LoraSpec,
        adapter: str = ADAPTER_NAME,
    ) -> LoraNetwork:
        """Inject into the models `spec` applies to (TE first, like the reference's order)."""
        modules: list[LoraModule] = []
        configs: dict[Root, Any] = {}
        for root, model, wanted in (
            ("text_encoder", text_encoder, spec.apply_text_encoder),
            ("unet", unet, spec.apply_unet),
        ):
            if not wanted:
                continue
            found, config = inject(model, root, spec, adapter)
            modules += found
            if config is not None:
                configs[root] = config
            log.info("LoRA for %s: %d modules", root.replace("_", " "), len(found))
        network = cls(modules, spec, configs, adapter)
        network.install_dropouts()
        return network

    def of(self, root: Root) -> list[LoraModule]:
        return [m for m in self.modules if m.target.root == root]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules for p in (m.down.weight, m.up.weight)]

    def train(self, mode: bool = True) -> None:
        """Train mode turns the dropouts on (they act only while the adapter layers train)."""
        for m in self.modules:
            m.down.train(mode)
            m.up.train(mode)

    def is_training(self) -> bool:
        return any(m.down.training for m in self.modules)

    def install_dropouts(self) -> None:
        """Neuron/rank dropout on down(x) and module dropout, exactly as the reference (§7.3).

        peft's own lora_dropout acts on the input x, not on down(x), so it stays off and these
        hooks do the reference's math on the peft layers instead.
        """
        from functools import partial

        spec = self.spec
        for m in self.modules:
            if spec.dropout or spec.rank_dropout:
                self._hooks.append(
                    m.down.register_forward_hook(
                        partial(_down_dropout, spec.dropout, spec.rank_dropout, m.rank)
                    )
                )
            if spec.module_dropout:
                self._hooks.append(
                    m.layer.register_forward_pre_hook(
                        partial(_module_dropout_on, spec.module_dropout, m.down)
                    )
                )
                self._hooks.append(m.layer.register_forward_hook(_module_dropout_off))

    def param_groups(self, text_encoder_lr: float, unet_lr: float) -> list[ParamGroup]:
        """`textencoder`, `unet` (or `unet_block<i>`) groups, each with a LoRA+ `plus` group.

        A group with LR 0 is dropped and its parameters frozen; its modules are still saved.
        """
        groups: list[ParamGroup] = []
        for root, lr, label in (
            ("text_encoder", text_encoder_lr, "textencoder"),
            ("unet", unet_lr, "unet"),
        ):
            modules = self.of(root)  # type: ignore[arg-type]
            ratio = self.spec.plus_ratio(root)  # type: ignore[arg-type]
            weights = self.spec.blocks.lr_weights if self.spec.blocks else None
            if root == "unet" and weights is not None:
                by_block: dict[int, list[LoraModule]] = {}
                for m in modules:
                    by_block.setdefault(block_index(m.target.name), []).append(m)
                for idx, block in by_block.items():
                    groups += _assemble(block, lr * weights[idx], ratio, f"unet_block{idx}")
            elif modules:
                groups += _assemble(modules, lr, ratio, label)
        return groups

    def apply_max_norm(self, max_norm: float) -> dict[str, float]:
        """scale_weight_norms: shrink each module whose scaled ΔW norm exceeds max_norm (§7.3)."""
        import torch

        norms: list[float] = []
        scaled = 0
        with torch.no_grad():
            for m in self.modules:
                down, up = m.down.weight, m.up.weight
                delta = delta_weight(down.float(), up.float()) * (m.alpha / m.rank)
                norm = delta.norm().clamp(min=max_norm / 2)
                ratio = (torch.clamp(norm, max=max_norm) / norm).item()
                if ratio != 1:
                    scaled += 1
                    down.mul_(ratio**0.5)
                    up.mul_(ratio**0.5)
                norms.append(delta.norm().item() * ratio)
        if not norms:
            return {}
        return {
            "max_norm/keys_scaled": float(scaled),
            "max_norm/average_key_norm": sum(norms) / len(norms),
            "max_norm/max_key_norm": max(norms),
        }


def _assemble(
    modules: list[LoraModule], lr: float, ratio: float | None, name: str
) -> list[ParamGroup]:
    main = [
        p for m in modules for p in ((m.down.weight,) if ratio else (m.down.weight, m.up.weight))
    ]
    plus = [m.up.weight for m in modules] if ratio else []
    out = []
    for params, group_lr, group_name in (
        (main, lr, name),
        (plus, lr * (ratio or 0), name + " plus"),
    ):
        if not params:
            continue
        if not group_lr:
            log.info("%s: learning rate 0, not trained (its modules are still saved)", group_name)
            for p in params:
                p.requires_grad_(False)
            continue
        out.append(ParamGroup(name=group_name, params=params, lr=group_lr))
    return out


def _down_dropout(
    p: float | None,
    rank_p: float | None,
    rank: int,
    module: torch.nn.Module,
    args: Any,
    out: torch.Tensor,
) -> torch.Tensor:
    """Forward hook on lora_A: neuron dropout, then rank dropout with 1/(1-p) rescaling."""
    if not module.training:
        return out
    import torch

    if p:
        out = torch.nn.functional.dropout(out, p=p)
    if rank_p:
        mask = torch.rand((out.size(0), rank), device=out.device) > rank_p
        if out.dim() == 3:  # (B, L, r)
            mask = mask.unsqueeze(1)
        elif out.dim() == 4:  # (B, r, H, W)
            mask = mask.unsqueeze(-1).unsqueeze(-1)
        out = out * mask * (1.0 / (1.0 - rank_p))
    return out


def _module_dropout_on(p: float, down: torch.nn.Module, layer: Any, args: Any) -> None:
    """Pre-hook: skip the whole LoRA branch with probability p (no compute, no gradient)."""
    import torch

    if down.training and not layer._disable_adapters and torch.rand(1).item() < p:
        layer._disable_adapters = True  # peft's own switch; the post-hook turns it back off
        layer._sdtrain_dropped = True


def _module_dropout_off(layer: Any, args: Any, out: Any) -> None:
    if getattr(layer, "_sdtrain_dropped", False):
        layer._disable_adapters = False
        layer._sdtrain_dropped = False
