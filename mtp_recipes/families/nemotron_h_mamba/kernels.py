"""Mamba2 SSD scan backends and the per-call choice between them.

Three scans compute the same thing and reset their state at every document start in ``seq_idx``:

* ``mamba_ssm-triton``: ``mamba_chunk_scan_combined(..., seq_idx=)`` from mamba-ssm's ``ops/triton``. On an
  H100 (a 1.2B mixer, S=4096, bf16) it ran fwd+bwd 40x faster than transformers' torch fallback with 115x less
  memory.
  Needs the ``mamba_ssm`` package, which is hard to build.
* ``triton``: our kernels (``triton_ssd.py``), which need only ``triton`` (it ships with CUDA
  builds of torch). No initial or final states, which training never uses.
* ``torch``: our bounded-memory chunked scan (``ssd.py``), for CPU and everything else.

``auto`` (the default) picks, for CUDA inputs, mamba_ssm's kernel when it imports, else ours when Triton
imports, else the torch scan; CPU inputs always take the torch scan. Imports are guarded and cached: a
missing or broken package means "not available", never a failed run. The environment variable
``MTP_RECIPES_MAMBA_SCAN=auto|torch|triton|mamba_ssm`` forces one (benchmarks, debugging; ``triton`` on a CPU
needs ``TRITON_INTERPRET=1``).

The conv before the scan is the ``causal_conv1d`` package's kernel for CUDA inputs when it imports (it
honours ``seq_idx``), else our boundary-aware torch conv (:mod:`~mtp_recipes.families.nemotron_h_mamba.conv`, a width-4
depthwise conv, cheap next to the scan). When the scan is mamba_ssm's and ``causal_conv1d`` imports too,
the mixer runs mamba_ssm's fused conv + scan + norm + out_proj kernel instead.

The mamba_ssm and causal_conv1d calls are checked here only against fake modules (no GPU, neither package
in CI); our kernels run in Triton's interpreter in CI. On a GPU a cold mamba_ssm autotune takes minutes
(keep ``TRITON_CACHE_DIR`` persistent), and ``D`` / ``dt_bias`` are cast to fp32 so every layer shares one
autotune key.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch

from mtp_recipes.errors import ConfigError
from mtp_recipes.families.nemotron_h_mamba.conv import causal_conv1d_varlen
from mtp_recipes.families.nemotron_h_mamba.ssd import ssd_chunk_scan

logger = logging.getLogger(__name__)

MAMBA_SSM_SCAN_MODULE = "mamba_ssm.ops.triton.ssd_combined"
CAUSAL_CONV1D_MODULE = "causal_conv1d"
OUR_SCAN_MODULE = "mtp_recipes.families.nemotron_h_mamba.triton_ssd"
SCAN_ENV = "MTP_RECIPES_MAMBA_SCAN"
SCAN_CHOICES = ("auto", "torch", "triton", "mamba_ssm")


def _import_attribute(module_name: str, attribute: str) -> Callable[..., Any] | None:
    """``module_name.attribute``, or ``None`` when it cannot be imported.

    Any exception counts as "not available": a broken Triton install must fall back, not stop training.
    """
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - see docstring
        logger.debug("%s unavailable: %s", module_name, exc)
        return None
    return getattr(module, attribute, None)


@torch.compiler.assume_constant_result  # a compiled block sees the lookup's result, not the import
@functools.cache
def mamba_ssm_chunk_scan() -> Callable[..., Any] | None:
    """``mamba_chunk_scan_combined`` from mamba_ssm's Triton ops, or ``None``."""
    return _import_attribute(MAMBA_SSM_SCAN_MODULE, "mamba_chunk_scan_combined")


@torch.compiler.assume_constant_result
@functools.cache
def mamba_ssm_fused_kernel() -> Callable[..., Any] | None:
    """``mamba_split_conv1d_scan_combined`` (conv + scan + gated norm + out_proj) from mamba_ssm, or ``None``."""
    return _import_attribute(MAMBA_SSM_SCAN_MODULE, "mamba_split_conv1d_scan_combined")


@torch.compiler.assume_constant_result
@functools.cache
def causal_conv1d_kernel() -> Callable[..., Any] | None:
    """``causal_conv1d_fn`` from the ``causal_conv1d`` package (CUDA, honours ``seq_idx``), or ``None``."""
    return _import_attribute(CAUSAL_CONV1D_MODULE, "causal_conv1d_fn")


@torch.compiler.assume_constant_result
@functools.cache
def our_triton_scan() -> Callable[..., Any] | None:
    """:func:`.triton_ssd.ssd_chunk_scan_triton`, or ``None`` when Triton does not import."""
    return _import_attribute(OUR_SCAN_MODULE, "ssd_chunk_scan_triton")


@torch.compiler.assume_constant_result
def _forced_choice() -> str:
    choice = os.environ.get(SCAN_ENV, "auto")
    if choice not in SCAN_CHOICES:
        raise ConfigError(f"{SCAN_ENV}={choice!r} is not one of {', '.join(SCAN_CHOICES)}; unset it or pick one")
    return choice


def on_cuda(tensor: torch.Tensor) -> bool:
    """The device test, a function of its own so tests can stand in for a GPU."""
    return tensor.is_cuda


def _int32(seq_idx: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``seq_idx`` as the contiguous int32 on ``like``'s device that the CUDA kernels require."""
    return None if seq_idx is None else seq_idx.to(device=like.device, dtype=torch.int32).contiguous()


def scan_backend(hidden_states: torch.Tensor, stateful: bool = False) -> str:
    """Which scan :func:`mamba2_chunk_scan` runs for this input: ``"mamba_ssm-triton"``, ``"triton"`` or ``"torch"``.

    ``stateful`` (initial or final states wanted) rules out our kernels. A forced backend that cannot be
    imported is a :class:`ConfigError`, not a silent fallback (the recipe asks once at setup, so it stops
    before any work).
    """
    choice = _forced_choice()
    if choice == "auto" and not on_cuda(hidden_states):
        return "torch"
    if choice in ("auto", "mamba_ssm") and mamba_ssm_chunk_scan() is not None:
        return "mamba_ssm-triton"
    if choice in ("auto", "triton") and our_triton_scan() is not None and not stateful:
        return "triton"
    if choice in ("auto", "torch") or (choice == "triton" and stateful):
        return "torch"
    raise ConfigError(f"{SCAN_ENV}={choice} but that scan does not import here; install it or unset {SCAN_ENV}")


def describe_scan(hidden_states: torch.Tensor) -> str:
    """One line naming the scan and conv that Mamba2 layers run on ``hidden_states``' device, and why.

    The recipe logs it once at setup, so a run on a GPU says whether it got a fused kernel or the torch scan.
    """
    backend = scan_backend(hidden_states)
    choice = _forced_choice()
    if choice != "auto":
        reason = f"forced by {SCAN_ENV}={choice}"
    elif not on_cuda(hidden_states):
        reason = "CPU tensors always take the torch scan"
    elif backend == "mamba_ssm-triton":
        reason = "mamba_ssm imports"
    elif backend == "triton":
        reason = "mamba_ssm does not import, Triton does"
    else:
        reason = "neither mamba_ssm nor Triton imports"
    conv = "causal_conv1d's kernel" if on_cuda(hidden_states) and causal_conv1d_kernel() is not None else "torch"
    return f"Mamba2 scan: {backend} ({reason}); conv: {conv}"


def mamba2_chunk_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    seq_idx: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Mamba2 SSD scan (arguments as :func:`~.ssd.ssd_chunk_scan`) on :func:`scan_backend`'s choice.

    Every backend resets the state at each document start in ``seq_idx``.

    Longer than 60 lines because it repeats the scan's keyword signature (it dispatches those arguments to one
    of three backends, each called with its own argument names).
    """
    backend = scan_backend(hidden_states, stateful=initial_states is not None or return_final_states)
    if backend == "triton":
        return _our_triton_scan(
            hidden_states,
            dt,
            A,
            B,
            C,
            D=D,
            dt_bias=dt_bias,
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
            seq_idx=seq_idx,
            z=z,
        )
    if backend == "torch":
        return ssd_chunk_scan(
            hidden_states,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            dt_bias=dt_bias,
            initial_states=initial_states,
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
            return_final_states=return_final_states,
            seq_idx=seq_idx,
            z=z,
        )
    kernel = mamba_ssm_chunk_scan()
    return kernel(
        hidden_states,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=None if D is None else D.float(),
        z=z,
        dt_bias=None if dt_bias is None else dt_bias.float(),
        initial_states=initial_states,
        seq_idx=_int32(seq_idx, hidden_states),
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
    )


@torch.compiler.disable  # Triton kernels inside an autograd.Function: keep them out of compiled graphs
def _our_triton_scan(*args: Any, **kwargs: Any) -> torch.Tensor:
    return our_triton_scan()(*args, **kwargs)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """Depthwise causal conv + activation over ``x [B, C, S]`` that never reads across a document start.

    The ``causal_conv1d`` kernel for CUDA inputs when it imports (it supports SiLU only), else our torch conv.
    """
    kernel = causal_conv1d_kernel() if on_cuda(x) and activation in ("silu", "swish", None) else None
    if kernel is None:
        return causal_conv1d_varlen(x, weight, bias, seq_idx, activation)
    return kernel(x, weight, bias, seq_idx=_int32(seq_idx, x), activation=None if activation is None else "silu")


def fused_mixer_kernel(zxbcdt: torch.Tensor, padded: bool) -> Callable[..., torch.Tensor] | None:
    """mamba_ssm's fused conv + scan + gated norm + out_proj for this call, or ``None`` for the separate path.

    Used only where the separate path would run mamba_ssm's scan and ``causal_conv1d`` imports (the fused
    kernel calls it), and never for padded batches (the separate path zeroes padding after the conv too).
    """
    if padded or scan_backend(zxbcdt) != "mamba_ssm-triton" or causal_conv1d_kernel() is None:
        return None
    kernel = mamba_ssm_fused_kernel()
    if kernel is None:
        return None

    def fused(*args: Any, seq_idx: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return kernel(*args, seq_idx=_int32(seq_idx, zxbcdt), **kwargs)

    return fused
