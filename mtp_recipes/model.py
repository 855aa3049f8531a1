"""MTPModel: a transformers backbone plus our D MTP depths, with HF checkpoints in and out.

The forward pass and the loss are family-independent: the family only builds modules, runs blocks and
names keys (see :mod:`mtp_recipes.families.base`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from mtp_recipes import hf_compat
from mtp_recipes.checkpoint.hf import fp8_block_size, read_config_dict
from mtp_recipes.checkpoint.keymap import KeyMap
from mtp_recipes.checkpoint.locate import resolve_model_dir
from mtp_recipes.checkpoint.provenance import Provenance
from mtp_recipes.document_layout import document_layout
from mtp_recipes.errors import ConfigError
from mtp_recipes.families import Family, get_family
from mtp_recipes.lora import LoraSettings, apply_lora, checkpoint_names, init_adapters
from mtp_recipes.loss import AcceptanceStats, acceptance_stats, main_loss, mtp_loss
from mtp_recipes.model_checkpoint import export_config, load_checkpoint, save_checkpoint
from mtp_recipes.model_config import config_from_dict, family_mtp_config
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.roll import roll_ids
from mtp_recipes.mtp.stack import MTPStack

logger = logging.getLogger("mtp_recipes")


@dataclass
class MTPOutput:
    """What one forward pass returns. Losses are means over the (global, when given) target counts.

    Backpropagate ``loss``; ``main_loss`` and ``mtp_losses`` (each depth's CE, unscaled) are its parts for logging
    (detached when the shared head computes them in one call).
    """

    loss: torch.Tensor | None
    main_loss: torch.Tensor | None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    mtp_hidden_states: list[torch.Tensor] = field(default_factory=list)
    # With ``return_accuracy``: per-depth hit counts and, per depth, how many valid slots'
    # drafts equal the backbone's own argmax at slot t+k (what greedy self-verification accepts).
    acceptance: AcceptanceStats | None = None
    agreement: torch.Tensor | None = None


class MTPModel(nn.Module):
    """Backbone (transformers modeling code) + :class:`MTPStack`.

    ``forward`` takes already-shifted labels and returns the main loss, the per-depth MTP
    losses (unscaled) and ``loss = main + λ·Σ_k w_k CE_k`` (``w_k = 1/D`` unless ``mtp.depth_weights`` or
    ``depth_decay``), without ever materialising full logits.
    """

    def __init__(
        self,
        hf_config: PretrainedConfig,
        mtp_config: MTPConfig,
        family: Family | None = None,
        *,
        attn_implementation: str | None = None,
        experts_implementation: str | None = None,
        frozen_dtype: torch.dtype | None = None,
        lora: LoraSettings | None = None,
        engine: str = "vllm",
    ) -> None:
        """``engine`` (``serving.engine``) picks the drafting conventions the depths train with (the family's rule
        for that engine's newest release; ``mtp.zero_first_embedding`` overrides one of them).

        ``frozen_dtype``: with ``mtp.train_only`` the backbone (with ``lora``, every weight LoRA freezes) is
        built in this dtype (the compute dtype, bf16 on GPU) instead of the master-weight dtype: it gets no
        gradients or optimizer state, so fp32 copies of it would only double its memory. Trainable parameters
        (MTP depths, LoRA adapters) keep the default (master) dtype. ``lora`` injects LoRA adapters
        (:mod:`mtp_recipes.lora`)."""
        super().__init__()
        self.family = family or get_family(hf_config.model_type)
        # Set before any module is built so the MTP blocks (built from copies of this config) agree.
        hf_compat.set_implementations(hf_config, attn_implementation, experts_implementation)
        self.config = hf_config
        self.text_config = self.family.text_config(hf_config)
        self.mtp_config = mtp_config
        self.lora = lora
        frozen = frozen_dtype if mtp_config.train_only or lora is not None else None
        with _default_dtype(frozen) if frozen is not None else contextlib.nullcontext():
            self.backbone = _build_backbone(self.family, hf_config)
        frozen_depths = frozen if lora is not None and lora.mtp == "lora" else None
        with _default_dtype(frozen_depths) if frozen_depths is not None else contextlib.nullcontext():
            depths = [
                self.family.build_depth(self.text_config, mtp_config, i) for i in range(mtp_config.num_physical_layers)
            ]
        for depth in depths:
            for module in depth.modules():
                hf_compat.init_module_weights(self.backbone, module)
        self.engine = engine
        self.conventions = self.family.conventions(engine)
        if mtp_config.zero_first_embedding is not None:
            self.conventions = replace(self.conventions, zero_first_embedding=mtp_config.zero_first_embedding)
        self.mtp = MTPStack(depths, mtp_config, self.conventions.passes_on, self.conventions.zero_first_embedding)
        if mtp_config.init == "from_scratch":
            self.init_mtp_from_backbone()
        if mtp_config.train_only:
            self.backbone.requires_grad_(False)
        self.lora_targets = apply_lora(self, lora) if lora is not None else []
        if lora is not None and self.backbone.get_input_embeddings().weight.device.type != "meta":
            init_adapters(self, lora.seed)
        # Filled when loaded from a checkpoint: where it came from and each tensor's on-disk dtype.
        self.provenance = Provenance()

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        hf_config: PretrainedConfig | dict[str, Any],
        *,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        experts_implementation: str | None = None,
        frozen_dtype: torch.dtype | str | None = None,
        lora: LoraSettings | None = None,
        engine: str = "vllm",
        **mtp_overrides: Any,
    ) -> MTPModel:
        """A randomly initialised model (debug sizes, tests); MTP settings from the config + overrides."""
        source = hf_config if isinstance(hf_config, dict) else None
        if source is not None:
            hf_config = config_from_dict(source)
        family = get_family(hf_config.model_type)
        mtp = family_mtp_config(family, hf_config, source, mtp_overrides)
        with _default_dtype(_as_dtype(dtype) or torch.get_default_dtype()):
            return cls(
                hf_config,
                mtp,
                family,
                attn_implementation=attn_implementation,
                experts_implementation=experts_implementation,
                frozen_dtype=_as_dtype(frozen_dtype),
                lora=lora,
                engine=engine,
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        experts_implementation: str | None = None,
        shard: Callable[[MTPModel], Any] | None = None,
        device: torch.device | str | None = None,
        frozen_dtype: torch.dtype | str | None = None,
        load_weights: bool = True,
        lora: LoraSettings | None = None,
        engine: str = "vllm",
        **mtp_overrides: Any,
    ) -> MTPModel:
        """Load a Hugging Face checkpoint *including* its MTP tensors (which transformers would drop).

        ``dtype`` is the parameter dtype to train in (default float32: exact master weights); the
        on-disk dtypes are remembered and restored by :meth:`save_pretrained`. With ``shard`` (e.g.
        FSDP2) or ``device``, the model is built on the meta device, ``shard(model)`` is applied, and
        only then is memory allocated on ``device`` and filled from the files, one tensor at a time:
        each process holds its own shard, never the whole model. ``load_weights=False`` (a resume, whose
        checkpoint holds every tensor) reads config.json only: the tensors stay uninitialised until
        filled, and :meth:`restore_export_source` gives back what the export needs from the source.
        """
        model_dir = resolve_model_dir(str(name_or_path))
        raw = read_config_dict(model_dir)
        fp8_block = fp8_block_size(raw, model_dir)
        # The export is dequantised (bfloat16): its config must not announce a quantisation.
        raw = {k: v for k, v in raw.items() if k != "quantization_config"}
        hf_config = config_from_dict(raw)
        family = get_family(hf_config.model_type)
        mtp = family_mtp_config(family, hf_config, raw, mtp_overrides)
        dtype = _as_dtype(dtype) or torch.float32
        on_meta = shard is not None or device is not None or not load_weights
        with _default_dtype(dtype), torch.device("meta") if on_meta else contextlib.nullcontext():
            model = cls(
                hf_config,
                mtp,
                family,
                attn_implementation=attn_implementation,
                experts_implementation=experts_implementation,
                frozen_dtype=_as_dtype(frozen_dtype),
                lora=lora,
                engine=engine,
            )
        if on_meta:
            if shard is not None:
                shard(model)
            model._materialize(torch.device(device or "cpu"))
        model.provenance = Provenance(source_dir=model_dir, source_config=raw, dequantized=fp8_block is not None)
        if not load_weights:
            model.backbone.tie_weights()  # as after a load: materialising may have untied them
            return model
        load_checkpoint(model, model_dir, fp8_block)
        if model.provenance.dequantized:
            logger.info("%s: block-scaled FP8 weights dequantised to %s on load", model_dir, dtype)
        return model

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        *,
        num_label_tokens: int | torch.Tensor | None = None,
        num_depth_tokens: list[int] | torch.Tensor | None = None,
        loss_scaling_factor: float | None = None,
        return_logits: bool = False,
        return_accuracy: bool = False,
    ) -> MTPOutput:
        """Run backbone and MTP depths; compute the losses when ``labels`` (already shifted) are given.

        Packed rows: a new document starts wherever ``seq_idx`` changes (ids may be reused along a row:
        ``[0, 0, 1, 1, 0, 0]`` is three documents), and ``position_ids`` restart at 0 exactly there. Given
        both, they must agree, else one ValueError names the first slot that does not; given one, the other
        is derived from it. ``num_label_tokens`` / ``num_depth_tokens`` are the main and per-depth target
        counts summed over all micro-batches and ranks of the optimizer step; without them each loss is a
        local mean. ``loss_scaling_factor`` is this step's λ (a schedule's value); ``None`` takes the model's
        ``mtp.loss_scaling_factor``.
        """
        position_ids, seq_idx = document_layout(input_ids, position_ids, seq_idx)  # equal ids <=> same document
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.mtp_config.train_only):
            hidden, h0 = self.family.backbone_states(
                self.backbone, input_ids, position_ids, seq_idx, self.conventions.h0
            )
        mtp_input = h0.detach() if self.mtp_config.detach_backbone else h0
        mtp_hidden: list[torch.Tensor] = []
        if self.mtp.num_layers:
            run_block = self.family.block_runner(self.backbone, hidden, position_ids, seq_idx)
            embed = self.backbone.get_input_embeddings()
            mtp_hidden = self.mtp(mtp_input, input_ids, embed, run_block, seq_idx, position_ids)

        head = self.backbone.get_output_embeddings().weight
        logits = hidden @ head.T if return_logits else None
        out = MTPOutput(None, None, logits=logits, hidden_states=hidden, mtp_hidden_states=mtp_hidden)
        if labels is None:
            return out
        lam = self.mtp_config.loss_scaling_factor if loss_scaling_factor is None else loss_scaling_factor
        return self._losses(out, labels, head, seq_idx, num_label_tokens, num_depth_tokens, lam, return_accuracy)

    def _losses(
        self,
        out: MTPOutput,
        labels: torch.Tensor,
        head: torch.Tensor,
        seq_idx: torch.Tensor | None,
        num_label_tokens: int | torch.Tensor | None,
        num_depth_tokens: list[int] | torch.Tensor | None,
        loss_scaling_factor: float,
        return_accuracy: bool,
    ) -> MTPOutput:
        """Fill ``out``'s losses (and with ``return_accuracy`` its acceptance counts and agreement)."""
        hidden, mtp_hidden = out.hidden_states, out.mtp_hidden_states
        # A shared head computes main + every depth in one chunked call (one fp32 cast of the head, one
        # gradient accumulator); a per-depth head, or a detached one, needs the main loss on its own.
        joint = bool(mtp_hidden) and self.family.head == "shared" and not self.mtp_config.detach_backbone
        if not joint:
            main = main_loss(hidden, labels, head, num_label_tokens=num_label_tokens, return_argmax=return_accuracy)
            out.main_loss, main_argmax = main if return_accuracy else (main, None)
            out.loss = out.main_loss
        if not mtp_hidden:
            return out
        result = mtp_loss(
            mtp_hidden,
            labels,
            self.mtp_heads(),
            loss_scaling_factor=loss_scaling_factor,
            seq_idx=seq_idx,
            normalization=self.mtp_config.normalization,
            num_label_tokens=num_label_tokens if num_label_tokens is not None else _count(labels),
            num_depth_tokens=num_depth_tokens,
            return_accuracy=return_accuracy,
            main_hidden=hidden if joint else None,
            depth_weights=self.mtp_config.depth_shares(),
            self_share=self.mtp_config.self_target_share,
            teacher_hidden=hidden,
            teacher_head=None if self.family.head == "shared" else head,
        )
        out.mtp_losses = list(result.per_depth)
        if joint:
            out.loss, out.main_loss, main_argmax = result.loss, result.main_loss, result.main_argmax
        else:
            out.loss = out.main_loss + result.loss
        if return_accuracy:
            out.acceptance = acceptance_stats(result.correct, result.valid)
            out.agreement = torch.stack(
                [
                    ((pred == roll_ids(main_argmax, k, seq_idx, fill=-1)) & valid).sum()
                    for k, (pred, valid) in enumerate(zip(result.predictions, result.valid, strict=True), start=1)
                ]
            )
        return out

    def blocks(self) -> list[nn.Module]:
        """The decoder blocks of the backbone and of every MTP depth: the units FSDP2 shards (and activation
        checkpointing and compile wrap) one by one, where expert parallelism finds the experts."""
        return [*self.family.backbone_blocks(self.backbone), *(b for d in self.mtp.depths for b in d.blocks)]

    def mtp_heads(self) -> torch.Tensor | list[torch.Tensor]:
        """The output weight(s) the depths project with: the shared ``lm_head`` or one head per depth."""
        if self.family.head == "per_depth":
            return [self.mtp.depth(k).head.weight for k in range(1, self.mtp.num_layers + 1)]
        head = self.backbone.get_output_embeddings().weight
        return head.detach() if self.mtp_config.detach_backbone else head

    def _materialize(self, device: torch.device) -> None:
        """Allocate a meta-built model on ``device``: what no checkpoint holds must be initialised here.

        Non-persistent buffers (rotary tables) are recomputed, and MTP depths get the family's fresh
        initialisation (overwritten by the checkpoint, or by ``from_scratch`` from the backbone).
        """
        self.to_empty(device=device)
        with torch.no_grad():
            for module in self.modules():
                if hf_compat.has_non_persistent_buffers(module):
                    hf_compat.init_module_weights(self.backbone, module)
            for module in self.mtp.modules():
                hf_compat.init_module_weights(self.backbone, module)
        if self.lora is not None:
            init_adapters(self, self.lora.seed)

    # ---- MTP initialisation and checkpoints ---------------------------------------------------
    def init_mtp_from_backbone(self, depths: list[int] | None = None) -> None:
        """``mtp.init=from_scratch`` (every depth) or ``extend`` (the new ``depths``): each MTP block starts as a
        copy of the backbone block the family names (:meth:`Family.donor_block`), compared and copied by its
        checkpoint names (a LoRA-adapted donor or block by its base weights). Fusion and norms keep the family's
        fresh initialisation (norms at identity, ``eh_proj`` random)."""
        layers = self.family.backbone_blocks(self.backbone)
        for index in range(len(self.mtp.depths)) if depths is None else depths:
            for block in self.mtp.depths[index].blocks:
                donor = self.family.donor_block(block, self.backbone)
                if donor is not None:
                    named = f"backbone block {layers.index(donor)}" if donor in layers else "its backbone blocks"
                    _copy_block(block, donor, f"{self.family.block_kind(block)}", named)

    def keymap(self) -> KeyMap:
        pairs = [
            (f"mtp.depths.{i}.{inner}", hf)
            for i in range(self.mtp_config.num_physical_layers)
            for inner, hf in self.family.key_prefixes(self.text_config, self.mtp_config, i)
        ]
        return KeyMap(pairs)

    def checkpoint_state(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The state dict under the names of a model without LoRA (adapters left out): what checkpoints hold."""
        return checkpoint_names(self.state_dict(keep_vars=keep_vars))

    def export_config(self) -> dict[str, Any]:
        """config.json for the export: the source's own JSON (unknown fields kept) + current MTP fields."""
        return export_config(self)

    def serving_limits(self, engine: str | None = None) -> list[str]:
        """What ``engine`` (default: the one this model trains for, ``serving.engine``) cannot draft with in this
        MTP layout, one line each (docs/serving.md)."""
        limits = self.family.serving_limits(self.text_config, self.mtp_config)
        return [limit.line for limit in limits if (engine or self.engine) in limit.engines]

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        max_shard_size: int = 5 * 1024**3,
        writer: bool = True,
    ) -> Path:
        """Write a Hugging Face checkpoint with the MTP tensors in the layout serving engines load
        (:func:`mtp_recipes.model_checkpoint.save_checkpoint`). Under FSDP2 every rank calls this; only
        ``writer`` writes."""
        return save_checkpoint(self, save_directory, tokenizer=tokenizer, max_shard_size=max_shard_size, writer=writer)


def _build_backbone(family: Family, hf_config: PretrainedConfig) -> nn.Module:
    """The family's backbone; transformers' refusal of the configured attention kernel becomes one ConfigError line."""
    try:
        return family.build_backbone(hf_config)
    except ValueError as err:
        if not hf_compat.unsupported_attention(err):
            raise
        raise ConfigError(
            f"model.attn_implementation={hf_compat.attention_implementation(hf_config)}: "
            f"{str(err).split('. ')[0]}; set model.attn_implementation=eager"
        ) from None


def _copy_block(block: nn.Module, donor: nn.Module, kind: str, donor_name: str) -> None:
    """Copy ``donor``'s weights into ``block`` by checkpoint names; one ConfigError line when they differ."""
    ours, theirs = checkpoint_names(block.state_dict()), checkpoint_names(donor.state_dict())
    bad = [
        f"{name} {tuple(t.shape)} vs {tuple(theirs[name].shape) if name in theirs else 'none'}"
        for name, t in ours.items()
        if name not in theirs or t.shape != theirs[name].shape
    ]
    if bad:
        raise ConfigError(
            f"mtp.init=from_scratch: the MTP {kind} block cannot start from {donor_name}, whose "
            f"tensors differ ({', '.join(bad[:4])}{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}); make the "
            "MTP depth's config match the backbone's, or load MTP tensors from a checkpoint (mtp.init=from_checkpoint "
            "or extend)"
        )
    with torch.no_grad():
        for name, t in ours.items():
            t.copy_(theirs[name])


def _count(labels: torch.Tensor) -> int:
    return int((labels != -100).sum())


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in ``dtype`` (torch.set_default_dtype, restored afterwards, also on error)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


__all__ = ["MTPModel", "MTPOutput"]
