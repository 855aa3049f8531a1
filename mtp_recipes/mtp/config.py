"""MTPConfig: everything the MTP core needs to know, independent of the model family."""

from __future__ import annotations

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
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ConfigError(f"mtp.num_layers must be an integer >= 0, got {self.num_layers!r}")
        if self.loss_scaling_factor < 0:
            raise ConfigError(f"mtp.loss_scaling_factor must be >= 0, got {self.loss_scaling_factor}")
        if self.normalization not in ("depth_tokens", "main_tokens"):
            raise ConfigError(f"mtp.normalization must be 'depth_tokens' or 'main_tokens', got {self.normalization!r}")
        if self.init not in ("from_checkpoint", "from_scratch", "extend"):
            raise ConfigError(f"mtp.init must be from_checkpoint, from_scratch or extend, got {self.init!r}")
        if self.targets not in ("labels", "self", "mix"):
            raise ConfigError(f"mtp.targets must be labels, self or mix, got {self.targets!r}")
        if not 0 <= self.self_weight <= 1:
            raise ConfigError(f"mtp.self_weight must be in [0, 1], got {self.self_weight}")
        object.__setattr__(self, "block_types", tuple(self.block_types))
        if self.depth_weights is not None:
            object.__setattr__(self, "depth_weights", tuple(float(w) for w in self.depth_weights))
        self.depth_shares()  # weights that do not fit D fail here, not at the first loss

    def depth_shares(self) -> tuple[float, ...]:
        """``w_k / Σ_j w_j`` for k = 1..D: the share of λ each depth's CE gets (``1/D`` each by default)."""
        d, weights, beta = self.num_layers, self.depth_weights, self.depth_decay
        if weights is not None and beta is not None:
            raise ConfigError("set mtp.depth_weights or mtp.depth_decay, not both")
        if beta is not None:
            if beta <= 0:
                raise ConfigError(f"mtp.depth_decay must be > 0, got {beta}")
            weights = tuple(beta**k for k in range(d))
        if weights is None:
            return tuple(1 / d for _ in range(d))
        if len(weights) != d:
            raise ConfigError(f"mtp.depth_weights has {len(weights)} entries for {d} MTP depths (mtp.num_layers)")
        if any(w < 0 for w in weights) or (d and sum(weights) <= 0):
            raise ConfigError(f"mtp.depth_weights must be >= 0 with a positive sum, got {list(weights)}")
        total = sum(weights)
        return tuple(w / total for w in weights)

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
