"""Frozen sub-modules: weights kept in the state dict under their names but never optimised.

An attention indexer only selects keys (integer top-k turned into a mask), so the LM loss sends it no gradient;
its weights become persistent buffers, and its linear layers compute in their input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtp_recipes.hf_compat import swap_class


class InputDtypeLinear(nn.Linear):
    """``nn.Linear`` that computes in its input's dtype: a frozen projection, whose weight is a buffer.

    FSDP2's mixed-precision policy casts parameters only, so a buffer weight would stay float32 and meet bf16
    activations in its matmul; cast at use, as autocast does in a one-process run, the stored buffer keeps its
    dtype and values, so checkpoints stay bit-exact.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, self.weight.to(input.dtype), bias)


def freeze_modules(module: nn.Module, kind: type[nn.Module]) -> None:
    """Turn every weight of each ``kind`` module under ``module`` into a persistent buffer (kept in the state dict,
    never optimised), its linear layers computing in their input's dtype."""
    for frozen in [m for m in module.modules() if isinstance(m, kind)]:
        for sub in frozen.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                delattr(sub, name)
                sub.register_buffer(name, param.detach())
            if type(sub) is nn.Linear:
                swap_class(sub, InputDtypeLinear)
