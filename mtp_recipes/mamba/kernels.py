"""Mamba2 SSD scan on the GPU: ``mamba_ssm``'s Triton kernel when it can be used, else our torch scan.

Why: on an H100 (shared/bench/MAMBA.md) ``mamba_chunk_scan_combined(..., seq_idx=)`` from mamba-ssm's
``ops/triton`` ran fwd+bwd 40x faster than transformers' torch fallback with 115x less memory, and gave
the same result on a packed row as on each document alone. Our torch scan (:mod:`mtp_recipes.mamba.ssd`)
is bounded in memory and boundary-aware too, but far slower on a GPU.

Selection is automatic and per call: the kernel is used when the module imports (a guarded, cached
import: nothing breaks when ``mamba_ssm`` or ``triton`` is missing, or when importing Triton fails on a
machine without a driver) and the input is a CUDA tensor; everything else takes the torch scan. The
conv before the scan is not handled here: our boundary-aware torch conv (:mod:`mtp_recipes.mamba.conv`)
is a width-4 depthwise conv, cheap next to the scan, and the ``causal_conv1d`` kernel, when installed, is
picked by :mod:`mtp_recipes.mamba.patch`.

The kernel call itself is UNTESTED in this repository's CI (no GPU, no mamba_ssm); tests check the
selection and the arguments with a fake module. Things a GPU session must watch (MAMBA.md): a cold
Triton autotune takes minutes (keep ``TRITON_CACHE_DIR`` persistent), and ``D`` / ``dt_bias`` are cast
to fp32 here so every layer shares one autotune key.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from mtp_recipes.mamba.ssd import mamba2_chunk_scan as torch_chunk_scan

logger = logging.getLogger(__name__)

TRITON_SCAN_MODULE = "mamba_ssm.ops.triton.ssd_combined"


@torch.compiler.assume_constant_result  # a compiled block sees the lookup's result, not the import
@functools.cache
def triton_chunk_scan() -> Callable[..., Any] | None:
    """``mamba_chunk_scan_combined`` from mamba_ssm's Triton ops, or ``None`` when it cannot be imported.

    Any exception counts as "not available": a broken Triton install must fall back, not stop training.
    """
    try:
        module = importlib.import_module(TRITON_SCAN_MODULE)
    except Exception as exc:  # noqa: BLE001 - see docstring
        logger.debug("mamba_ssm Triton scan unavailable: %s", exc)
        return None
    return getattr(module, "mamba_chunk_scan_combined", None)


def _on_cuda(tensor: torch.Tensor) -> bool:
    """The device test, a function of its own so tests can stand in for a GPU."""
    return tensor.is_cuda


def scan_backend(hidden_states: torch.Tensor) -> str:
    """Which scan :func:`mamba2_chunk_scan` would run for this input: ``"mamba_ssm-triton"`` or ``"torch"``."""
    return "mamba_ssm-triton" if triton_chunk_scan() is not None and _on_cuda(hidden_states) else "torch"


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
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``mamba2_chunk_scan`` (``seq_idx`` and ``z`` come in ``kwargs``).

    Runs the Triton kernel for CUDA inputs when it imports, else :func:`mtp_recipes.mamba.ssd.mamba2_chunk_scan`.
    Both reset the state at every document start in ``seq_idx``.
    """
    # Device first: CPU inputs never reach the import (which torch.compile cannot trace).
    kernel = triton_chunk_scan() if _on_cuda(hidden_states) else None
    if kernel is None:
        return torch_chunk_scan(
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
            **kwargs,
        )
    seq_idx = kwargs.get("seq_idx")
    return kernel(
        hidden_states,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=None if D is None else D.float(),
        z=kwargs.get("z"),
        dt_bias=None if dt_bias is None else dt_bias.float(),
        initial_states=initial_states,
        seq_idx=None if seq_idx is None else seq_idx.to(device=hidden_states.device, dtype=torch.int32).contiguous(),
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
    )
