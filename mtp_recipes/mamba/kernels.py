"""Mamba2 SSD scan backends and the per-call choice between them.

Three scans compute the same thing and reset their state at every document start in ``seq_idx``:

* ``mamba_ssm-triton``: ``mamba_chunk_scan_combined(..., seq_idx=)`` from mamba-ssm's ``ops/triton``. On an
  H100 (shared/bench/MAMBA.md) it ran fwd+bwd 40x faster than transformers' torch fallback with 115x less memory.
  Needs the ``mamba_ssm`` package, which is hard to build.
* ``triton``: our kernels (:mod:`mtp_recipes.mamba.triton_ssd`), which need only ``triton`` (it ships with CUDA
  builds of torch). No initial or final states, which training never uses.
* ``torch``: our bounded-memory chunked scan (:mod:`mtp_recipes.mamba.ssd`), for CPU and everything else.

``auto`` (the default) picks, for CUDA inputs, mamba_ssm's kernel when it imports, else ours when Triton
imports, else the torch scan; CPU inputs always take the torch scan. Imports are guarded and cached: a
missing or broken package means "not available", never a failed run. The environment variable
``MTP_RECIPES_MAMBA_SCAN=auto|torch|triton|mamba_ssm`` forces one (benchmarks, debugging; ``triton`` on a CPU
needs ``TRITON_INTERPRET=1``). The conv before the scan is not handled here: our boundary-aware torch conv
(:mod:`mtp_recipes.mamba.conv`) is a width-4 depthwise conv, cheap next to the scan, and the
``causal_conv1d`` kernel, when installed, is picked by :mod:`mtp_recipes.mamba.patch`.

The mamba_ssm call is checked here only against a fake module (no GPU, no mamba_ssm in CI); our kernels run
in Triton's interpreter in CI. GPU notes (MAMBA.md): a cold mamba_ssm autotune takes minutes (keep
``TRITON_CACHE_DIR`` persistent), and ``D`` / ``dt_bias`` are cast to fp32 so every layer shares one
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
from mtp_recipes.mamba.ssd import mamba2_chunk_scan as torch_chunk_scan

logger = logging.getLogger(__name__)

MAMBA_SSM_SCAN_MODULE = "mamba_ssm.ops.triton.ssd_combined"
OUR_SCAN_MODULE = "mtp_recipes.mamba.triton_ssd"
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
def our_triton_scan() -> Callable[..., Any] | None:
    """:func:`mtp_recipes.mamba.triton_ssd.ssd_chunk_scan_triton`, or ``None`` when Triton does not import."""
    return _import_attribute(OUR_SCAN_MODULE, "ssd_chunk_scan_triton")


@torch.compiler.assume_constant_result
def _forced_choice() -> str:
    choice = os.environ.get(SCAN_ENV, "auto")
    if choice not in SCAN_CHOICES:
        raise ConfigError(f"{SCAN_ENV}={choice!r} is not one of {', '.join(SCAN_CHOICES)}; unset it or pick one")
    return choice


def _on_cuda(tensor: torch.Tensor) -> bool:
    """The device test, a function of its own so tests can stand in for a GPU."""
    return tensor.is_cuda


def scan_backend(hidden_states: torch.Tensor, stateful: bool = False) -> str:
    """Which scan :func:`mamba2_chunk_scan` runs for this input: ``"mamba_ssm-triton"``, ``"triton"`` or ``"torch"``.

    ``stateful`` (initial or final states wanted) rules out our kernels. A forced backend that cannot be
    imported is a :class:`ConfigError`, not a silent fallback (the recipe asks once at setup, so it stops
    before any work).
    """
    choice = _forced_choice()
    if choice == "auto" and not _on_cuda(hidden_states):
        return "torch"
    if choice in ("auto", "mamba_ssm") and mamba_ssm_chunk_scan() is not None:
        return "mamba_ssm-triton"
    if choice in ("auto", "triton") and our_triton_scan() is not None and not stateful:
        return "triton"
    if choice in ("auto", "torch") or (choice == "triton" and stateful):
        return "torch"
    raise ConfigError(f"{SCAN_ENV}={choice} but that scan does not import here; install it or unset {SCAN_ENV}")


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

    The backend is :func:`scan_backend`'s choice; every backend resets the state at each document start in
    ``seq_idx``.
    """
    backend = scan_backend(hidden_states, stateful=initial_states is not None or return_final_states)
    if backend == "triton":
        return _our_triton_scan(
            hidden_states, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
            seq_idx=kwargs.get("seq_idx"), z=kwargs.get("z"),
        )
    if backend == "torch":
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
    kernel = mamba_ssm_chunk_scan()
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


@torch.compiler.disable  # Triton kernels inside an autograd.Function: keep them out of compiled graphs
def _our_triton_scan(*args: Any, **kwargs: Any) -> torch.Tensor:
    return our_triton_scan()(*args, **kwargs)
