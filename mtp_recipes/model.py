"""MTPModel: a transformers backbone plus our D MTP depths, with HF checkpoints in and out.

The forward pass and the loss are family-independent: the family only builds modules, runs blocks and
names keys (see :mod:`mtp_recipes.families.base`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from mtp_recipes import hf_compat
from mtp_recipes.checkpoint.hf import (
    CheckpointLayout,
    fp8_block_size,
    gather_full,
    load_model_state,
    read_config_dict,
    resolve_model_dir,
    save_model_state,
)
from mtp_recipes.checkpoint.keymap import KeyMap
from mtp_recipes.errors import ConfigError
from mtp_recipes.families.base import Family, get_family
from mtp_recipes.lora import (
    MTP_STEM,
    LoraSettings,
    adapter_writer,
    apply_lora,
    checkpoint_names,
    gather_adapter,
    init_adapters,
)
from mtp_recipes.loss import AcceptanceStats, acceptance_stats, main_loss, mtp_loss
from mtp_recipes.model_config import config_from_dict, family_mtp_config
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.roll import roll_ids
from mtp_recipes.mtp.stack import MTPStack
from mtp_recipes.packed import document_layout

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
    ) -> None:
        """``frozen_dtype``: with ``mtp.train_only`` the backbone (with ``lora``, every weight LoRA freezes) is
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
            self.backbone = self.family.build_backbone(hf_config)
        frozen_depths = frozen if lora is not None and lora.mtp == "lora" else None
        with _default_dtype(frozen_depths) if frozen_depths is not None else contextlib.nullcontext():
            depths = [
                self.family.build_depth(self.text_config, mtp_config, i) for i in range(mtp_config.num_physical_layers)
            ]
        for depth in depths:
            for module in depth.modules():
                hf_compat.init_module_weights(self.backbone, module)
        zero_first = mtp_config.zero_first_embedding
        self.mtp = MTPStack(
            depths,
            mtp_config,
            self.family.passes_on,
            self.family.zero_first_embedding if zero_first is None else zero_first,
        )
        if mtp_config.init == "from_scratch":
            self.init_mtp_from_backbone()
        if mtp_config.train_only:
            self.backbone.requires_grad_(False)
        self.lora_targets = apply_lora(self, lora) if lora is not None else []
        if lora is not None and self.backbone.get_input_embeddings().weight.device.type != "meta":
            init_adapters(self, lora.seed)
        # Filled when loaded from a checkpoint: where it came from and each tensor's on-disk dtype.
        self.source_dir: Path | None = None
        self.source_config: dict[str, Any] | None = None
        self.disk_dtypes: dict[str, torch.dtype] = {}
        self.dequantized = False  # loaded from block-scaled FP8: exported in bfloat16

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
            )
        if on_meta:
            if shard is not None:
                shard(model)
            model._materialize(torch.device(device or "cpu"))
        model.source_dir, model.source_config = model_dir, raw
        if not load_weights:
            model.backbone.tie_weights()  # as after a load: materialising may have untied them
            return model
        model.disk_dtypes = load_model_state(model, model_dir, fp8_block)
        model.dequantized = fp8_block is not None
        if model.dequantized:
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
        return_logits: bool = False,
        return_accuracy: bool = False,
    ) -> MTPOutput:
        """Run backbone and MTP depths; compute the losses when ``labels`` (already shifted) are given.

        Packed rows: a new document starts wherever ``seq_idx`` changes (ids may be reused along a row:
        ``[0, 0, 1, 1, 0, 0]`` is three documents), and ``position_ids`` restart at 0 exactly there. Given
        both, they must agree, else one ValueError names the first slot that does not; given one, the other
        is derived from it. ``num_label_tokens`` / ``num_depth_tokens`` are the main and per-depth target
        counts summed over all micro-batches and ranks of the optimizer step; without them each loss is a
        local mean.
        """
        position_ids, seq_idx = document_layout(input_ids, position_ids, seq_idx)  # equal ids <=> same document
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.mtp_config.train_only):
            hidden, h0 = self.family.backbone_states(self.backbone, input_ids, position_ids, seq_idx)
        mtp_input = h0.detach() if self.mtp_config.detach_backbone else h0
        mtp_hidden: list[torch.Tensor] = []
        if self.mtp.num_depths:
            run_block = self.family.block_runner(self.backbone, hidden, position_ids, seq_idx)
            embed = self.backbone.get_input_embeddings()
            mtp_hidden = self.mtp(mtp_input, input_ids, embed, run_block, seq_idx, position_ids)

        head = self.backbone.get_output_embeddings().weight
        logits = hidden @ head.T if return_logits else None
        out = MTPOutput(None, None, logits=logits, hidden_states=hidden, mtp_hidden_states=mtp_hidden)
        if labels is None:
            return out
        return self._losses(out, labels, head, seq_idx, num_label_tokens, num_depth_tokens, return_accuracy)

    def _losses(
        self,
        out: MTPOutput,
        labels: torch.Tensor,
        head: torch.Tensor,
        seq_idx: torch.Tensor | None,
        num_label_tokens: int | torch.Tensor | None,
        num_depth_tokens: list[int] | torch.Tensor | None,
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
            loss_scaling_factor=self.mtp_config.loss_scaling_factor,
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

    def mtp_heads(self) -> torch.Tensor | list[torch.Tensor]:
        """The output weight(s) the depths project with: the shared ``lm_head`` or one head per depth."""
        if self.family.head == "per_depth":
            return [self.mtp.depth(k).head.weight for k in range(1, self.mtp.num_depths + 1)]
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
    def init_mtp_from_backbone(self) -> None:
        for depth in self.mtp.depths:
            self.family.init_depth_from_backbone(depth, self.backbone)

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

    def tied_keys(self) -> set[str]:
        """Checkpoint keys that alias an earlier tensor (e.g. a tied ``lm_head``); never saved twice."""
        seen: set[int] = set()
        tied = set()
        for key, tensor in self.checkpoint_state(keep_vars=True).items():
            if id(tensor) in seen:  # tied weights are one Parameter object, sharded or not
                tied.add(key)
            seen.add(id(tensor))
        return tied

    def export_config(self) -> dict[str, Any]:
        """config.json for the export: the source's own JSON (unknown fields kept) + current MTP fields."""
        raw = copy.deepcopy(self.source_config) if self.source_config else json.loads(self.config.to_json_string())
        section = raw.get("text_config", raw) if self.text_config is not self.config else raw
        self.family.write_export_fields(section, self.mtp_config)
        if self.source_config is None:  # a model built from scratch: say which class to load it with
            raw.setdefault("architectures", [type(self.backbone).__name__])
        return raw

    def export_source(self) -> dict[str, Any]:
        """What an export takes from the loaded checkpoint, as JSON: kept in resume checkpoints, so a resume
        never reads the source's tensor files (on-disk dtypes, layout prefix, passthrough tensors' files)."""
        layout = getattr(self, "checkpoint_layout", None) or CheckpointLayout()
        return {
            "disk_dtypes": {k: str(v).removeprefix("torch.") for k, v in self.disk_dtypes.items()},
            "prefix": layout.prefix,
            "passthrough": {k: str(f) for k, f in layout.passthrough.items()},
            "dequantized": self.dequantized,
        }

    def restore_export_source(self, source: dict[str, Any]) -> None:
        """The inverse of :meth:`export_source`."""
        self.disk_dtypes = {k: getattr(torch, v) for k, v in source["disk_dtypes"].items()}
        self.checkpoint_layout = CheckpointLayout(
            source["prefix"], {k: Path(f) for k, f in source["passthrough"].items()}
        )
        self.dequantized = source["dequantized"]

    def serving_limits(self) -> list[str]:
        """One line per serving engine that cannot draft with this model's MTP layout (docs/serving.md)."""
        return self.family.serving_limits(self.text_config, self.mtp_config)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        max_shard_size: int = 5 * 1024**3,
        writer: bool = True,
    ) -> Path:
        """Write a Hugging Face checkpoint with the MTP tensors in the layout serving engines load.

        Under FSDP2 every rank calls this (each tensor is gathered collectively); only ``writer`` writes.
        With LoRA the adapters are merged into their weights (``lora.export=merged``: the same files and names
        as without LoRA), or ``lora.export=adapter`` writes peft's adapter files for the backbone
        (``adapter_model.safetensors``, ``adapter_config.json``) and the MTP tensors, merged, in
        ``mtp.safetensors`` under their checkpoint names.
        """
        if writer:
            for limit in self.serving_limits():
                logger.warning("export to %s: %s", save_directory, limit)
            if self.dequantized:
                logger.info("export to %s: FP8 source weights are written in BF16, not re-quantised", save_directory)
        adapter = self.lora is not None and self.lora.export == "adapter"
        extra = None
        if adapter:
            tensors = gather_adapter(self, writer, gather_full)  # collective
            base = str(self.source_dir) if self.source_dir is not None else None
            extra = adapter_writer(self.lora, tensors, self.lora_targets, base) if writer else None
        return save_model_state(
            self,
            save_directory,
            config_dict=None if adapter else self.export_config(),
            disk_dtypes=self.disk_dtypes,
            default_dtype=_as_dtype(getattr(self.config, "dtype", None)),
            copy_files_from=None if adapter else self.source_dir,
            max_shard_bytes=max_shard_size,
            tokenizer=tokenizer,
            writer=writer,
            select=self.keymap().is_mtp if adapter else None,
            stem=MTP_STEM if adapter else "model",
            extra_files=extra,
        )


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
