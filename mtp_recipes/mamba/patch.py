"""Make Nemotron-H's Mamba2 mixers keep packed documents apart (``seq_idx``) on the pure-torch path.

How transformers 5.23 binds the mixer's functions: ``causal_conv1d_fn`` and ``mamba2_chunk_scan`` are
module-level functions of ``modeling_nemotron_h``, each wrapped by ``use_kernel_func_from_hub_with_fallback``
(picks ``causal_conv1d`` / ``mamba_ssm`` when importable, else the torch body, and *raises* on ``seq_idx`` in the
torch case). ``use_kernelized_func`` on the class only registers them for the optional ``kernels`` package (a
no-op without it); ``NemotronHMamba2Mixer.forward`` itself resolves the names through the module globals at call
time.

So the hook is per instance and leaves transformers untouched: :func:`use_boundary_aware_mamba` swaps each mixer's
class for :class:`BoundaryAwareNemotronHMamba2Mixer`, whose ``forward`` is transformers' own forward code
re-bound to a copy of the module globals in which those two names point at :mod:`mtp_recipes.mamba`'s
implementations, and the fused training-mode ``mamba2_split_conv1d_scan_combined`` (whose kernel-less wrapper
also raises on ``seq_idx``) at a stand-in returning ``None``, so the mixer takes the separate conv + scan path.
Everything else (caches, ``apply_mask_to_padding_states``, gating, projections) is the upstream code unchanged,
and :func:`restore_default_mamba` swaps the class back.

``seq_idx`` reaches the mixer through the model forward: ``TransformersKwargs`` declares it, ``NemotronHModel``
passes ``**kwargs`` to each block and the block to its mixer, which hands them to both functions.

GPU: the scan goes through :func:`mtp_recipes.mamba.kernels.mamba2_chunk_scan`, which runs ``mamba_ssm``'s Triton
``mamba_chunk_scan_combined(seq_idx=)`` for CUDA inputs when that module imports and our torch scan otherwise. The
conv keeps the upstream ``causal_conv1d`` kernel for CUDA inputs when that package is installed (it honours
``seq_idx``), else our boundary-aware torch conv. The fused training-mode ``mamba_split_conv1d_scan_combined`` is
used only when *both* ``mamba_ssm`` and ``causal_conv1d`` are installed: with ``mamba_ssm`` alone transformers
binds it to a path that calls the missing conv extension (MAMBA.md, pitfall 1). The patched forward casts
``seq_idx`` to the int32 those kernels require. The kernel paths are untested here (no CUDA in CI).
"""

from __future__ import annotations

import functools
import importlib.util
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from mtp_recipes.mamba import kernels
from mtp_recipes.mamba.conv import causal_conv1d_fn


def _has_cuda_kernel(package: str) -> bool:
    """Whether transformers' wrapper will dispatch to a compiled kernel (it imports the package by this name)."""
    return importlib.util.find_spec(package) is not None


def _prefer_cuda_kernel(ours: Callable[..., Any], upstream: Callable[..., Any], *packages: str) -> Callable[..., Any]:
    """``upstream`` for CUDA tensors when all ``packages`` are installed (their kernels honour ``seq_idx``), else
    ``ours``."""
    if not all(_has_cuda_kernel(package) for package in packages):
        return ours

    @functools.wraps(ours)
    def dispatch(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        impl = upstream if hidden_states.is_cuda else ours
        return impl(hidden_states, *args, **kwargs)

    return dispatch


def _take_unfused_path(*args: Any, **kwargs: Any) -> None:
    """Stand-in for the fused ``mamba_split_conv1d_scan_combined`` without its kernel.

    ``None`` is what transformers' own fallback returns and tells the mixer to run the separate conv and scan
    (ours). Needed because transformers' wrapper *raises* on ``seq_idx`` when ``mamba_ssm`` is missing, and the
    training-mode forward calls it first.
    """
    return None


def _rebind_globals(func: Callable[..., Any], overrides: dict[str, Any]) -> Callable[..., Any]:
    """A copy of ``func`` whose global-name lookups see ``overrides`` first (the original is left untouched)."""
    new_globals = {**func.__globals__, **overrides}
    rebound = types.FunctionType(func.__code__, new_globals, func.__name__, func.__defaults__, func.__closure__)
    rebound.__kwdefaults__ = func.__kwdefaults__
    rebound.__qualname__ = func.__qualname__
    rebound.__doc__ = func.__doc__
    return rebound


# ``NemotronHMamba2Mixer.forward`` is ``force_accelerate_hooks("conv1d")(<body>)``; rebind the body, then re-wrap.
_boundary_aware_forward_body = _rebind_globals(
    hf.NemotronHMamba2Mixer.forward.__wrapped__,
    {
        "causal_conv1d_fn": _prefer_cuda_kernel(causal_conv1d_fn, hf.causal_conv1d_fn, "causal_conv1d"),
        "mamba2_chunk_scan": kernels.mamba2_chunk_scan,
        "mamba2_split_conv1d_scan_combined": _prefer_cuda_kernel(
            _take_unfused_path, hf.mamba2_split_conv1d_scan_combined, "mamba_ssm", "causal_conv1d"
        ),
    },
)


class BoundaryAwareNemotronHMamba2Mixer(hf.NemotronHMamba2Mixer):
    """``NemotronHMamba2Mixer`` whose conv and chunked scan reset at document starts given by ``seq_idx``.

    Same parameters, state dict and (absent ``seq_idx``) outputs as the parent; only created by class swap in
    :func:`use_boundary_aware_mamba`, never constructed directly.
    """

    @force_accelerate_hooks("conv1d")
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seq_idx = kwargs.get("seq_idx")
        if seq_idx is not None:
            # The CUDA kernels insist on int32; the torch implementations accept any integer dtype.
            kwargs["seq_idx"] = seq_idx.to(device=hidden_states.device, dtype=torch.int32)
        return _boundary_aware_forward_body(self, hidden_states, *args, **kwargs)


def use_boundary_aware_mamba(model: nn.Module) -> int:
    """Make every ``NemotronHMamba2Mixer`` in ``model`` (backbone and MTP blocks alike) honour ``seq_idx``.

    Pass ``seq_idx [B, S]`` (one id per packed document) to the model forward together with ``position_ids`` that
    restart at 0 per document, ``attention_mask=None`` and ``use_cache=False``: transformers only derives the
    block-diagonal attention mask from packed ``position_ids`` when there is neither a 2D mask nor a cache.
    Idempotent; returns the number of mixers switched. Reverse with :func:`restore_default_mamba`.
    """
    switched = 0
    for module in model.modules():
        if type(module) is hf.NemotronHMamba2Mixer:
            module.__class__ = BoundaryAwareNemotronHMamba2Mixer
            switched += 1
    return switched


def restore_default_mamba(model: nn.Module) -> int:
    """Undo :func:`use_boundary_aware_mamba` on ``model``; returns the number of mixers restored."""
    restored = 0
    for module in model.modules():
        if type(module) is BoundaryAwareNemotronHMamba2Mixer:
            module.__class__ = hf.NemotronHMamba2Mixer
            restored += 1
    return restored
