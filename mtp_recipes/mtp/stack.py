"""MTPDepth (fusion -> family blocks -> head norm) and MTPStack (D depths, optionally one reused).

The core knows nothing about families: a depth receives its blocks, norms and optional head ready-made
from the family, and runs each block through a ``BlockRunner`` the family supplies (masks, rotary
embeddings and call signatures differ between model families).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.roll import roll_ids

BlockRunner = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# Which of a depth's two states (or the backbone's) another depth reads: after or before the final norm.
PassesOn = Literal["normed", "pre_norm"]


class MTPDepth(nn.Module):
    """One MTP depth: ``x = eh_proj(cat[enorm(emb), hnorm(h_prev)])``, the family blocks, the head norm.

    ``final_norm`` is the norm in front of the head (Nemotron-H's ``final_layernorm``, DeepSeek-V3's and
    Step-3.5's ``shared_head.norm``); ``head`` is a per-depth output layer or ``None`` when the depth
    uses the backbone's shared ``lm_head``.
    """

    def __init__(
        self,
        hidden_size: int,
        enorm: nn.Module,
        hnorm: nn.Module,
        blocks: list[nn.Module],
        final_norm: nn.Module,
        head: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.enorm = enorm
        self.hnorm = hnorm
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.head = head

    @classmethod
    def with_norms(
        cls, hidden_size: int, norm: Callable[[], nn.Module], blocks: list[nn.Module], head: nn.Linear | None = None
    ) -> MTPDepth:
        """A depth whose three norms (``enorm``, ``hnorm``, ``final_norm``) are fresh ``norm()`` modules, the
        backbone's own norm class: how every family builds one."""
        return cls(hidden_size, norm(), norm(), blocks, norm(), head)

    def forward(
        self, embeds: torch.Tensor, prev_hidden: torch.Tensor, run_block: BlockRunner
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(normed, pre_norm)``: the head input and the block output before the head norm."""
        # Embedding first, then the previous hidden state (DeepSeek-V3, Megatron, vLLM).
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(prev_hidden)], dim=-1))
        for block in self.blocks:
            x = run_block(block, x)
        return self.final_norm(x), x


class MTPStack(nn.Module):
    """D depths applied in sequence; depth k sees the tokens ``k`` places ahead (within a document)."""

    def __init__(
        self, depths: list[MTPDepth], config: MTPConfig, passes_on: PassesOn, zero_first_embedding: bool = False
    ) -> None:
        super().__init__()
        if len(depths) != config.num_physical_layers:
            raise ValueError(f"expected {config.num_physical_layers} physical depths, got {len(depths)}")
        self.depths = nn.ModuleList(depths)
        self.config = config
        self.passes_on = passes_on
        self.zero_first_embedding = zero_first_embedding

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def depth(self, k: int) -> MTPDepth:
        """The module that computes depth ``k`` (1-based); in repeated mode always the same one."""
        return self.depths[0 if self.config.use_repeated_layer else k - 1]

    def forward(
        self,
        h0: torch.Tensor,
        input_ids: torch.Tensor,
        embed: nn.Module,
        run_block: BlockRunner,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Return the D head inputs ``[B, S, H]`` (depth k at slot t predicts token ``t + k + 1``).

        ``h0`` is the backbone state depth 1 reads (the engine's convention, ``MTPModel.conventions.h0``). With
        ``zero_first_embedding``, depth 1's embedding is zero at slots whose position is 0: the serving
        engine's drafter does this at the position it runs at, which for depth k is the slot's position
        plus k - 1, so only depth 1 ever meets position 0.
        """
        hidden = h0
        outputs: list[torch.Tensor] = []
        for k in range(1, self.num_layers + 1):
            embeds = embed(roll_ids(input_ids, k, seq_idx))
            if k == 1 and self.zero_first_embedding and position_ids is not None:
                embeds = embeds.masked_fill((position_ids == 0).unsqueeze(-1), 0.0)
            if self.config.detach_backbone:
                embeds = embeds.detach()
            normed, pre_norm = self.depth(k)(embeds, hidden, run_block)
            outputs.append(normed)
            hidden = normed if self.passes_on == "normed" else pre_norm
        return outputs
