"""Nemotron-H's Mamba2 mixer, training forward of our own: packed documents stay apart (``seq_idx``).

transformers' mixer forward dispatches to kernel wrappers whose names, signatures and fallbacks change
between releases, and whose torch fallbacks refuse ``seq_idx``. :func:`mamba2_mixer_forward` computes the
same output from the mixer's own parameters only (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``,
``norm``, ``out_proj``: the checkpoint's names) and its config's public fields, with our boundary-aware
conv and scan: in_proj → split (gate, xBC, dt) → causal conv + activation → SSD scan with ``D`` skip →
gated RMSNorm (gate applied before normalising, per group) → out_proj.

:class:`BoundaryAwareMamba2Mixer` is transformers' mixer class with that forward for every call without a
cache (training, validation); a call with a cache (generation) is transformers' own forward, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from mtp_recipes import hf_compat
from mtp_recipes.families.nemotron_h_mamba import kernels


@dataclass(frozen=True)
class Mamba2Dims:
    """The sizes and constants of one Mamba2 mixer, from the public fields of a Nemotron-H config."""

    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    chunk_size: int
    dt_min: float
    activation: str
    eps: float

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> Mamba2Dims:
        return cls(
            num_heads=config.mamba_num_heads,
            head_dim=config.mamba_head_dim,
            n_groups=config.n_groups,
            state_size=config.ssm_state_size,
            chunk_size=config.chunk_size,
            dt_min=config.time_step_min,
            activation=config.mamba_hidden_act,
            eps=config.layer_norm_epsilon,
        )

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.n_groups * self.state_size


def gated_rms_norm(
    y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float
) -> torch.Tensor:
    """``weight * rmsnorm_per_group(y * silu(gate))`` in fp32 (fp64 for fp64), cast to ``y.dtype`` before weight.

    Mamba2's ``norm_before_gate=False`` variant: the gate multiplies first, then each of the ``n_groups``
    channel groups is normalised on its own.
    """
    dtype, cdt = y.dtype, torch.promote_types(y.dtype, torch.float32)
    x = y.to(cdt) * F.silu(gate.to(cdt))
    grouped = x.view(*x.shape[:-1], n_groups, -1)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.view_as(x).to(dtype)


def _zero_padding(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the states of padding tokens (a 2D ``[B, S]`` mask), as Mamba2 does before its projections."""
    if attention_mask is None or attention_mask.dim() != 2:
        return hidden
    return (hidden * attention_mask[:, :, None]).to(hidden.dtype)


def mamba2_mixer_forward(
    mixer: nn.Module,
    hidden_states: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A Nemotron-H Mamba2 mixer's output for ``hidden_states [B, S, H]`` with no cache.

    ``seq_idx [B, S]`` (one id per packed document) resets the conv window and the SSM state at every
    document start; ``attention_mask`` (2D, 1 = token) zeroes padding like transformers' mixer.

    Longer than 60 lines: transformers' own mixer forward in one piece (projections, conv, scan, gated norm), the
    fused mamba_ssm path beside the unfused one, so the two can be compared line by line.
    """
    dims = Mamba2Dims.from_config(mixer.config)
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    A = -torch.exp(mixer.A_log.to(torch.promote_types(mixer.A_log.dtype, torch.float32)))
    zxbcdt = mixer.in_proj(_zero_padding(hidden_states, attention_mask))

    fused = kernels.fused_mixer_kernel(zxbcdt, padded=attention_mask is not None and attention_mask.dim() == 2)
    if fused is not None:
        return fused(
            zxbcdt,
            mixer.conv1d.weight.squeeze(1),
            mixer.conv1d.bias,
            mixer.dt_bias,
            A,
            D=mixer.D,
            chunk_size=dims.chunk_size,
            seq_idx=seq_idx,
            dt_limit=(dims.dt_min, float("inf")),
            activation=dims.activation,
            rmsnorm_weight=mixer.norm.weight,
            rmsnorm_eps=dims.eps,
            outproj_weight=mixer.out_proj.weight,
            outproj_bias=mixer.out_proj.bias,
            headdim=dims.head_dim,
            ngroups=dims.n_groups,
            norm_before_gate=False,
        )

    gate, xbc, dt = zxbcdt.split([dims.inner, dims.conv_dim, dims.num_heads], dim=-1)
    conv = mixer.conv1d
    xbc = kernels.causal_conv1d(xbc.transpose(1, 2), conv.weight.squeeze(1), conv.bias, seq_idx, dims.activation)
    xbc = xbc.transpose(1, 2)
    x, B, C = _zero_padding(xbc, attention_mask).split(
        [dims.inner, dims.n_groups * dims.state_size, dims.n_groups * dims.state_size], dim=-1
    )
    y = kernels.mamba2_chunk_scan(
        x.view(batch, seq_len, dims.num_heads, dims.head_dim),
        dt,
        A,
        B.view(batch, seq_len, dims.n_groups, dims.state_size),
        C.view(batch, seq_len, dims.n_groups, dims.state_size),
        dims.chunk_size,
        D=mixer.D,
        dt_bias=mixer.dt_bias,
        dt_softplus=True,
        dt_limit=(dims.dt_min, float("inf")),
        seq_idx=seq_idx,
    )
    y = gated_rms_norm(y.reshape(batch, seq_len, dims.inner), gate, mixer.norm.weight, dims.n_groups, dims.eps)
    return mixer.out_proj(y.to(dtype))


class BoundaryAwareMamba2Mixer(NemotronHMamba2Mixer):
    """transformers' Nemotron-H mixer (same parameters and state dict) whose cache-less forward is ours.

    Only made by :func:`use_boundary_aware_mamba` (a class change, so weights, FSDP wrapping and
    transformers' weight initialisation all see the same module). Calls that carry a cache, or that pass
    arguments positionally, are transformers' own forward.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or hf_compat.passed_cache(kwargs) is not None:
            return super().forward(hidden_states, *args, **kwargs)
        return mamba2_mixer_forward(self, hidden_states, kwargs.get("seq_idx"), kwargs.get("attention_mask"))


def use_boundary_aware_mamba(model: nn.Module) -> int:
    """Give every Nemotron-H Mamba2 mixer in ``model`` (backbone and MTP blocks) our packed-aware forward.

    Then pass ``seq_idx [B, S]`` to the model forward together with ``position_ids`` restarting at 0 per
    document, no 2D attention mask and ``use_cache=False``. Idempotent; returns the number of mixers changed.
    """
    changed = 0
    for module in model.modules():
        if type(module) is NemotronHMamba2Mixer:
            hf_compat.swap_class(module, BoundaryAwareMamba2Mixer)
            changed += 1
    return changed
