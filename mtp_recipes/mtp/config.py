"""MTPConfig: everything the MTP core needs to know, independent of the model family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from mtp_recipes.errors import ConfigError

Normalization = Literal["depth_tokens", "main_tokens"]
Init = Literal["from_checkpoint", "from_scratch", "extend"]
Targets = Literal["labels", "self", "mix"]


@dataclass(frozen=True)
class MTPConfig:
    """Settings of the D MTP depths.

    ``block_types`` is the family's description of the sublayers of one depth (for Nemotron-H a list
    such as ``["full_attention", "moe"]``; families with one fixed block leave it empty).
    """

    num_layers: int = 1
    block_types: tuple[str, ...] = ()
    loss_scaling_factor: float = 0.1
    use_repeated_layer: bool = False
    normalization: Normalization = "depth_tokens"
    init: Init = "from_checkpoint"
    detach_backbone: bool = False
    train_only: bool = False
    # Zero depth 1's input embedding at a document's first position, as vLLM does for some families;
    # ``None``: the family's serving default.
    zero_first_embedding: bool | None = None
    # Relative weight of each depth's CE (normalised to sum 1); ``depth_decay`` β gives β^(k-1). Neither: equal.
    depth_weights: tuple[float, ...] | None = None
    depth_decay: float | None = None
    # What depth k at slot t learns: the label at t+k, the backbone's own detached next-token distribution
    # at t+k (``self``), or ``(1 - self_weight) · labels + self_weight · self`` (``mix``).
    targets: Targets = "labels"
    self_weight: float = 0.5
    family_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(
            {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("block_types", "family_options")}
        )
        object.__setattr__(self, "block_types", tuple(self.block_types))
        if self.depth_weights is not None:
            object.__setattr__(self, "depth_weights", tuple(float(w) for w in self.depth_weights))

    def depth_shares(self) -> tuple[float, ...]:
        """``w_k / Σ_j w_j`` for k = 1..D: the share of λ each depth's CE gets (``1/D`` each by default)."""
        return depth_shares(self.num_layers, self.depth_weights, self.depth_decay)

    @property
    def self_target_share(self) -> float:
        """α: the share of depth k's target that is the backbone's own distribution (0 for ``labels``)."""
        return {"labels": 0.0, "self": 1.0, "mix": self.self_weight}[self.targets]

    @property
    def num_physical_layers(self) -> int:
        """Depth modules that hold weights: one when a single depth is reused D times."""
        if self.num_layers == 0:
            return 0
        return 1 if self.use_repeated_layer else self.num_layers

    def with_overrides(self, **overrides: Any) -> MTPConfig:
        """Return a copy with user overrides applied; ``None`` values mean "keep the checkpoint's"."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown MTP option(s) {unknown}; valid options are {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def depth_shares(
    num_layers: int, depth_weights: Sequence[float] | None = None, depth_decay: float | None = None
) -> tuple[float, ...]:
    """``w_k / Σ_j w_j`` for k = 1..D from ``mtp.depth_weights`` or ``mtp.depth_decay`` β (``w_k = β^(k-1)``).

    Equal weights (neither given) give ``1/D`` each, i.e. the loss ``(λ / D) · Σ_k CE_k``.
    """
    check_options({"num_layers": num_layers, "depth_weights": depth_weights, "depth_decay": depth_decay})
    if depth_decay is not None:
        depth_weights = [depth_decay**k for k in range(num_layers)]
    if depth_weights is None:
        return tuple(1 / num_layers for _ in range(num_layers))
    total = sum(float(w) for w in depth_weights)
    return tuple(float(w) / total for w in depth_weights)


_CHOICES = {
    "normalization": ("depth_tokens", "main_tokens"),
    "init": ("from_checkpoint", "from_scratch", "extend"),
    "targets": ("labels", "self", "mix"),
}


def check_options(options: Mapping[str, Any]) -> None:
    """Range-check ``mtp.*`` values, raising one :class:`ConfigError` line; absent keys are not checked.

    The one place these rules live: the run config is checked before any work starts (where ``num_layers`` may
    still be ``None``, the checkpoint's own), :class:`MTPConfig` on construction, the loss on its arguments.
    """
    d = options.get("num_layers")
    if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
        raise ConfigError(f"mtp.num_layers must be >= 0, got {d!r}")
    if options.get("loss_scaling_factor", 0) < 0:
        raise ConfigError(f"mtp.loss_scaling_factor must be >= 0, got {options['loss_scaling_factor']}")
    for key, allowed in _CHOICES.items():
        if key in options and options[key] not in allowed:
            choices = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            raise ConfigError(f"mtp.{key} must be {choices}, got {options[key]!r}")
    if not 0 <= options.get("self_weight", 0) <= 1:
        raise ConfigError(f"mtp.self_weight must be in [0, 1], got {options['self_weight']}")
    if options.get("train_only") and d == 0:
        raise ConfigError(
            "nothing to train: mtp.train_only=true freezes the backbone and mtp.num_layers=0 (set, or the "
            "checkpoint's) leaves no MTP depth; set mtp.num_layers >= 1 or mtp.train_only=false"
        )
    weights, beta = options.get("depth_weights"), options.get("depth_decay")
    if weights is not None and beta is not None:
        raise ConfigError("set mtp.depth_weights or mtp.depth_decay, not both")
    if beta is not None and beta <= 0:
        raise ConfigError(f"mtp.depth_decay must be > 0, got {beta}")
    if weights is not None:
        weights = [float(w) for w in weights]
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ConfigError(f"mtp.depth_weights must be >= 0 with a positive sum, got {weights}")
        if d is not None and len(weights) != d:
            raise ConfigError(f"mtp.depth_weights has {len(weights)} entries for {d} MTP depths (mtp.num_layers)")
