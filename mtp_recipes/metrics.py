"""Training FLOPs per token and model FLOPs utilisation (MFU).

Convention (the common ``6 N`` one, so MFU figures compare with other trainers'):

* ``6 × N_active`` FLOPs per trained token: 2 for the forward GEMMs and 4 for the two backward GEMMs
  (input and weight gradient) per parameter. Frozen parameters still cost their input-gradient
  GEMM; we do not discount them (``mtp.train_only`` runs therefore read slightly high).
* ``N_active`` = every parameter a token's GEMMs touch, each counted once per use: the backbone,
  each MTP depth (a physical layer reused by several depths counts once per depth), and the output
  head once for the main loss plus once per depth (the shared head is one tensor but 1 + D GEMMs).
* Input embeddings (of the backbone and, via the same table, the depths) are excluded: a lookup,
  not a matmul. Routed experts count ``top_k / n_experts`` of their parameters; the router and
  shared experts count in full.
* Optional: attention-score FLOPs (``QKᵀ`` and ``AV``) for a given sequence length, causal (half the
  keys on average) and assuming no sliding window; they grow with ``S`` and are small at 4k for
  models like ours. Mamba2 scan FLOPs are not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from mtp_recipes.errors import ConfigError
from mtp_recipes.families import get_family
from mtp_recipes.families.base import Family, projection_widths, transformers_experts

# Dense bf16 tensor-core peak (no sparsity) from the vendor datasheets, in FLOP/s. Matched as
# substrings of torch.cuda.get_device_name(), most specific first.
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("A100", 312e12),
)


def routed_expert_weights(root: nn.Module, family: Family | None = None) -> Iterator[nn.Parameter]:
    """The routed-expert stacks under ``root``: the 3-D ``[n_experts, ...]`` weights of the modules the family
    names as its experts (the ones expert parallelism splits; transformers' own without a family)."""
    for module in family.expert_modules(root) if family is not None else transformers_experts(root):
        yield from (p for p in module.parameters(recurse=False) if p.dim() == 3)


def _active_params(modules: list[nn.Module], family: Family | None, top_k: int | None, skip: set[int]) -> float:
    """Parameters of ``modules`` not in ``skip`` (ids), routed-expert stacks scaled by ``top_k / n_experts``."""
    total = 0.0
    for root in modules:
        routed = {id(p) for p in routed_expert_weights(root, family)}
        if routed and top_k is None:
            raise ValueError(f"{type(root).__name__} has routed experts but the config has no top-k")
        for param in {id(p): p for p in root.parameters()}.values():
            if id(param) in skip:
                continue
            total += param.numel() * top_k / param.shape[0] if id(param) in routed else param.numel()
    return total


def _attention_flops(
    modules: list[nn.Module], seq_len: int, widths: Callable[[nn.Module], tuple[int, int] | None]
) -> float:
    """Training FLOPs per token of the attention scores: 3 × 2·(S/2)·(q_dim + v_dim) per attention layer, the
    attention modules and their widths as ``widths`` (the family's ``attention_widths``) answers."""
    total = 0.0
    for root in modules:
        for module in root.modules():
            found = widths(module)
            if found is not None:
                total += 3 * 2 * (seq_len / 2) * sum(found)
    return total


def flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """Training FLOPs per token of ``model`` (module docstring for what counts).

    ``model`` is an :class:`~mtp_recipes.model.MTPModel` or a plain transformers ``*ForCausalLM``: of a
    registered family, the family answers as for an MTPModel; of any other model, the routed top-k is the
    config's ``num_experts_per_tok`` and attention modules are those with ``q_proj`` and ``o_proj``.
    With ``seq_len`` the causal attention-score FLOPs at that length are added.
    """
    mtp = getattr(model, "mtp", None)
    backbone = model.backbone if mtp is not None else model
    main_head = backbone.get_output_embeddings().weight
    config = model.text_config if mtp is not None else backbone.config
    depths = [mtp.depth(k) for k in range(1, mtp.num_layers + 1)] if mtp is not None else []
    if depths and isinstance(model.mtp_heads(), torch.Tensor):
        head_uses = [main_head] * (1 + len(depths))
    else:
        head_uses = [main_head, *(model.mtp_heads() if depths else [])]
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    skip |= {id(w) for w in head_uses}
    family = model.family if mtp is not None else _registered_family(config)
    top_k = family.routed_top_k(config) if family is not None else getattr(config, "num_experts_per_tok", None)
    active = _active_params([backbone], family, top_k, skip)
    active += sum(_active_params([depth], family, top_k, skip) for depth in depths)
    active += sum(w.numel() for w in head_uses)
    flops = 6 * active
    if seq_len is not None:
        flops += _attention_flops(
            [backbone, *depths], seq_len, family.attention_widths if family else projection_widths
        )
    return flops


def _registered_family(config: Any) -> Family | None:
    """The family serving a plain transformers model's ``model_type``, ``None`` for any other model."""
    try:
        return get_family(config.model_type)
    except ConfigError:
        return None


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU (H100/H200/A100); ``None`` on CPU or an unknown device."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a CUDA device name, or ``None`` when it is not in the table."""
    for key, peak in _PEAK_BF16:
        if key in name:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved ``tokens/s × FLOPs/token`` over ``peak``; ``None`` without a peak."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


@dataclass
class StepTotals:
    """Sums over one optimizer step's micro-batches, kept on the device until the step's one host copy.

    ``loss`` / ``main_ce`` / ``mtp_ce`` are sums of the (globally normalised) micro-batch losses; the
    per-depth counts are top-1 hits, valid slots, cumulative hits and slots, and agreement with the
    backbone's own argmax. ``stop`` counts ranks that were asked to stop, so that a stop request travels in
    the same collective as the metrics.
    """

    loss: torch.Tensor
    main_ce: torch.Tensor
    mtp_ce: torch.Tensor
    correct: torch.Tensor
    valid: torch.Tensor
    cum_correct: torch.Tensor
    cum_valid: torch.Tensor
    agree: torch.Tensor
    stop: torch.Tensor

    @classmethod
    def zeros(cls, depths: int, device: torch.device) -> StepTotals:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(z(), z(), z(depths), z(depths), z(depths), z(depths), z(depths), z(depths), z())

    def add(self, out: Any) -> None:
        """Accumulate one micro-batch's :class:`~mtp_recipes.model.MTPOutput` (no host sync)."""
        self.loss += out.loss.detach()
        self.main_ce += out.main_loss.detach()
        if out.mtp_losses:
            self.mtp_ce += torch.stack([c.detach() for c in out.mtp_losses]).to(torch.float64)
            acc = out.acceptance
            for total, part in zip(
                (self.correct, self.valid, self.cum_correct, self.cum_valid, self.agree),
                (acc.correct, acc.valid, acc.cum_correct, acc.cum_valid, out.agreement),
                strict=True,
            ):
                total += part.to(total.device, torch.float64)

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> StepTotals:
        """The sums over every rank, through one collective ``reduce`` of a flat tensor."""
        parts = [getattr(self, f.name) for f in fields(self)]
        flat = reduce(torch.cat([p.reshape(-1) for p in parts]))
        sizes = [p.numel() for p in parts]
        return StepTotals(*(c.view_as(p) for c, p in zip(flat.split(sizes), parts, strict=True)))

    def record(self, grad_norm: torch.Tensor) -> dict[str, float]:
        """The step's numbers on the host (one device-to-host copy): what metrics.jsonl records per step."""
        parts = [getattr(self, f.name) for f in fields(self)]
        host = torch.cat([*(p.reshape(-1) for p in parts), grad_norm.reshape(1).to(self.loss)]).tolist()
        d = self.mtp_ce.numel()
        loss, main_ce, ce = host[0], host[1], host[2 : 2 + d]
        correct, valid, cum_correct, cum_valid, agree = (host[2 + d * (i + 1) : 2 + d * (i + 2)] for i in range(5))
        cumulative = [c / max(v, 1) for c, v in zip(cum_correct, cum_valid, strict=True)]
        return {
            "loss": loss,
            "main_ce": main_ce,
            **{f"mtp_ce_{k}": v for k, v in enumerate(ce, start=1)},
            **{f"mtp_acc_{k}": c / max(v, 1) for k, (c, v) in enumerate(zip(correct, valid, strict=True), start=1)},
            **{f"mtp_cum_acc_{k}": v for k, v in enumerate(cumulative, start=1)},
            **{f"mtp_agree_{k}": a / max(v, 1) for k, (a, v) in enumerate(zip(agree, valid, strict=True), start=1)},
            "acceptance_length": 1 + sum(cumulative),
            "stop": host[-2],
            "grad_norm": host[-1],
        }
