"""LoraSpec: which LoRA modules exist, their ranks/alphas, dropouts and LR split ([network])."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sdtrain.config.schema_index import suggest
from sdtrain.errors import ConfigError, Problem
from sdtrain.methods.adapters.blocks import BlockPlan, block_index, block_plan
from sdtrain.methods.adapters.targets import Root, Target

if TYPE_CHECKING:
    from sdtrain.config.methods import NetworkSection

DEFAULT_DIM = 4
# network_args keys of the reference's networks.lora, all implemented here (§7.5)
NETWORK_ARGS = (
    "conv_dim",
    "conv_alpha",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)


@dataclass(frozen=True)
class LoraSpec:
    """Everything that decides which LoRA modules exist, their rank/alpha, dropouts and LR split.

    alpha 0 means alpha = rank (per module). `module_ranks` (kohya name -> (rank, alpha)) comes
    from a file (dim_from_weights) and then decides alone which modules exist.
    """

    dim: int = DEFAULT_DIM
    alpha: float = 1.0
    dropout: float | None = None  # neuron dropout on down(x)
    rank_dropout: float | None = None
    module_dropout: float | None = None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    blocks: BlockPlan | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    module_ranks: dict[str, tuple[int, float]] | None = None
    apply_unet: bool = True
    apply_text_encoder: bool = True
    args: dict[str, Any] = field(default_factory=dict)  # network_args as given (ss_network_args)

    @classmethod
    def from_section(cls, network: NetworkSection) -> LoraSpec:
        """Parse and validate [network]; every problem in network_args is reported at once."""
        problems: list[Problem] = []
        args = parse_network_args(network.network_args, problems)
        for key in args:
            if key == "dropout":
                problems.append(
                    _problem(
                        key,
                        args[key],
                        "not used by networks.lora",
                        "set network_dropout in [network] instead",
                    )
                )
            elif key not in NETWORK_ARGS:
                close = suggest(key, NETWORK_ARGS)
                problems.append(
                    _problem(
                        key,
                        args[key],
                        "unknown networks.lora argument",
                        f"did you mean `{close}`?"
                        if close
                        else "valid: " + ", ".join(NETWORK_ARGS),
                    )
                )
        dim = network.network_dim or DEFAULT_DIM
        conv_dim = _number(args, "conv_dim", int, problems, low=1)
        conv_alpha = _number(args, "conv_alpha", float, problems, low=0.0)
        if conv_dim is not None and conv_alpha is None:
            conv_alpha = 1.0  # the reference's default
        if conv_alpha is not None and conv_dim is None and "conv_block_dims" not in args:
            problems.append(_problem("conv_alpha", args["conv_alpha"], "needs conv_dim"))
        blocks = block_plan(args, dim, network.network_alpha, conv_dim, conv_alpha, problems)
        spec = cls(
            dim=dim,
            alpha=network.network_alpha,
            dropout=network.network_dropout or None,
            rank_dropout=_number(args, "rank_dropout", float, problems, low=0.0, high=1.0),
            module_dropout=_number(args, "module_dropout", float, problems, low=0.0, high=1.0),
            conv_dim=conv_dim,
            conv_alpha=conv_alpha,
            blocks=blocks,
            loraplus_lr_ratio=_number(args, "loraplus_lr_ratio", float, problems, low=0.0),
            loraplus_unet_lr_ratio=_number(
                args, "loraplus_unet_lr_ratio", float, problems, low=0.0
            ),
            loraplus_text_encoder_lr_ratio=_number(
                args, "loraplus_text_encoder_lr_ratio", float, problems, low=0.0
            ),
            apply_unet=not network.network_train_text_encoder_only,
            apply_text_encoder=not network.network_train_unet_only,
            args=args,
        )
        if problems:
            raise ConfigError(problems, hint="see the networks.lora network_args reference")
        return spec

    @property
    def with_conv(self) -> bool:
        """True when U-Net 3x3 parents (ResnetBlock2D, samplers) are walked too."""
        conv_blocks = self.blocks is not None and self.blocks.conv_dims is not None
        return self.module_ranks is not None or self.conv_dim is not None or conv_blocks

    def rank_for(self, target: Target) -> tuple[int, float] | None:
        """(rank, alpha) of the module for `target`, or None when it gets no module."""
        if self.module_ranks is not None:
            dim, alpha = self.module_ranks.get(target.name, (0, 0.0))
        elif target.root == "unet" and self.blocks is not None:
            idx = block_index(target.name)
            if idx < 0:
                raise ValueError(f"{target.name} is in no U-Net block")
            if target.kind != "conv":
                dim, alpha = self.blocks.dims[idx], self.blocks.alphas[idx]
            elif self.blocks.conv_dims is not None and self.blocks.conv_alphas is not None:
                dim, alpha = self.blocks.conv_dims[idx], self.blocks.conv_alphas[idx]
            else:
                return None
        elif target.kind != "conv":
            dim, alpha = self.dim, self.alpha
        elif self.conv_dim is not None:
            dim, alpha = self.conv_dim, self.conv_alpha or 0.0
        else:
            return None
        if not dim:
            return None
        return int(dim), float(alpha) if alpha else float(dim)

    def plus_ratio(self, root: Root) -> float | None:
        """LoRA+ ratio for the up weights of `root` (specific ratio, else the common one)."""
        own = self.loraplus_unet_lr_ratio if root == "unet" else self.loraplus_text_encoder_lr_ratio
        return own or self.loraplus_lr_ratio

    def with_module_ranks(self, ranks: dict[str, tuple[int, float]]) -> LoraSpec:
        """This spec with ranks/alphas taken from a file (dim_from_weights)."""
        clash = [
            k
            for k in (
                "conv_dim",
                "conv_alpha",
                "block_dims",
                "block_alphas",
                "conv_block_dims",
                "conv_block_alphas",
            )
            if k in self.args
        ]
        if clash:
            raise ConfigError(
                [
                    _problem(
                        k,
                        self.args[k],
                        "conflicts with dim_from_weights",
                        "the file decides every rank; remove this argument",
                    )
                    for k in clash
                ]
            )
        return replace(self, module_ranks=dict(ranks))


def _problem(key: str, value: Any, message: str, hint: str | None = None) -> Problem:
    return Problem(
        key=f"network.network_args.{key}", value=value, has_value=True, message=message, hint=hint
    )


def parse_network_args(raw: dict[str, Any] | list[str], problems: list[Problem]) -> dict[str, Any]:
    """A TOML table (typed values) or the reference's ["key=value", ...] (string values)."""
    if isinstance(raw, dict):
        return dict(raw)
    args: dict[str, Any] = {}
    for index, item in enumerate(raw):
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            problems.append(
                Problem(
                    key=f"network.network_args[{index}]",
                    value=item,
                    has_value=True,
                    message="expected key=value",
                    hint='e.g. "conv_dim=8", or a table {conv_dim = 8}',
                )
            )
            continue
        args[key.strip()] = value.strip()
    return args


def _number(
    args: dict[str, Any],
    key: str,
    kind: type,
    problems: list[Problem],
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """args[key] as int/float (strings converted like the reference), range-checked; or None."""
    value = args.get(key)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        problems.append(
            _problem(key, value, f"expected {'a whole number' if kind is int else 'a number'}")
        )
        return None
    if (low is not None and number < low) or (high is not None and number >= high):
        bounds = f">= {low}" + (f" and < {high}" if high is not None else "")
        problems.append(_problem(key, value, f"must be {bounds}"))
        return None
    return number
