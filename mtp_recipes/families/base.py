"""The Family interface and its registry.

A family answers a few questions about one Hugging Face ``model_type`` (how many MTP depths its config
declares, how to build one depth from the backbone's own block classes, how to run a block, where its MTP
tensors live on disk) and nothing else. The core, the model and the trainer only talk to this interface,
so adding a family never touches them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from mtp_recipes import hf_compat
from mtp_recipes.checkpoint.nesting import Nesting
from mtp_recipes.engines import Conventions, EngineRule, ServingLimit
from mtp_recipes.errors import ConfigError
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import BlockRunner, MTPDepth, PassesOn

KeyPrefixes = list[tuple[str, str]]


class Family(ABC):
    """How one model family builds, runs and names its MTP depths."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    head: ClassVar[Literal["shared", "per_depth"]] = "shared"
    # What each serving engine release does with this family's MTP export (newest first per engine): the
    # drafting math the depths are trained with (serving.engine picks the engine) and what
    # ``python -m mtp_recipes.check`` checks an export against.
    engine_rules: ClassVar[tuple[EngineRule, ...]] = ()
    # How a multimodal checkpoint may nest the language model's tensors: the loader maps the nesting it finds to
    # the text model's names, the saver maps them back, and the other towers' tensors are copied verbatim.
    checkpoint_nestings: ClassVar[tuple[Nesting, ...]] = ()
    # Whether ``mtp.block_types`` may choose the sublayers of one depth; a family whose depths have one fixed
    # layout refuses a value instead of ignoring it.
    configurable_blocks: ClassVar[bool] = False
    # Names (last dotted part) of linear layers LoRA must not adapt: the family's kernels read their weight
    # directly instead of calling the layer, so an adapter there would be trained and exported but never run.
    lora_skipped: ClassVar[tuple[str, ...]] = ()
    # The oldest transformers release whose modeling code the family runs on, where that is newer than the oldest
    # release the package supports: on an older one the family refuses in one line, and the others still work.
    min_transformers: ClassVar[str | None] = None
    # Whether the MTP block reads its attention mask as a tensor even where sdpa could run without one (an indexer
    # scores keys under it): the block then always gets the mask built.
    block_reads_mask: ClassVar[bool] = False
    # The attention type of the MTP blocks where the decoder builds a mask and a rotary table per layer type
    # (``sliding_attention``, ``full_attention``); ``None``: one causal mask and one rotary table for every layer.
    mtp_layer_type: ClassVar[str | None] = None

    def conventions(self, engine: str) -> Conventions:
        """The drafting math ``engine``'s newest release runs for this family; one ConfigError line when that
        engine does not draft with these MTP weights or has no rule."""
        rule = next((r for r in self.engine_rules if r.engine == engine), None)
        if rule is None or rule.conventions is None:
            served = sorted({r.engine for r in self.engine_rules if r.conventions is not None})
            why = "has no drafter for them" if rule is None else f"does not draft with them ({rule.source})"
            raise ConfigError(
                f"serving.engine={engine}: {rule.name if rule else engine} {why}; {self.name} MTP depths are "
                f"served by {', '.join(served) or 'no engine'}: set serving.engine to one of them"
            )
        return rule.conventions

    # ---- config -------------------------------------------------------------------------------
    def read_config(self, raw: dict[str, Any]) -> dict[str, Any]:
        """config.json as transformers is to read it: where a supported transformers release does not derive a field
        from the published names as newer ones do, the family writes it (default: unchanged)."""
        return raw

    def text_config(self, hf_config: PretrainedConfig) -> PretrainedConfig:
        """The config of the language model (the whole config for text-only families)."""
        return hf_config.get_text_config()

    @abstractmethod
    def mtp_config(
        self, hf_config: PretrainedConfig, source: dict[str, Any] | None = None, **overrides: Any
    ) -> MTPConfig:
        """D and the depth layout the checkpoint's config declares, then the user's overrides. ``source`` is the
        config.json dict the config came from (``None`` for a config built in code), for fields transformers
        drops."""

    @abstractmethod
    def write_export_fields(self, config_json: dict[str, Any], mtp: MTPConfig) -> None:
        """Write the config.json fields (of the text config) serving engines read for ``mtp`` into ``config_json``
        (:func:`set_fields` removes the ones given as ``None``: fields the engines would misread)."""

    # ---- modules ------------------------------------------------------------------------------
    def build_backbone(self, hf_config: PretrainedConfig) -> PreTrainedModel:
        """The backbone is transformers' own causal-LM class for this config, never remote code."""
        # The parameter dtype is the caller's (torch's default dtype), not the checkpoint's config.dtype.
        return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False, dtype=torch.get_default_dtype())

    @abstractmethod
    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        """Physical depth ``index`` built from the backbone's own block and norm classes."""

    def block_runner(
        self,
        backbone: PreTrainedModel,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        seq_idx: torch.Tensor | None,
    ) -> BlockRunner:
        """A function that runs one MTP block with the masks/rotary inputs the backbone would use.

        By default what a transformers decoder hands its layers: one causal mask (block-diagonal when
        ``position_ids`` restart per document) and one ``(cos, sin)`` pair for the unrolled positions; with
        ``mtp_layer_type``, the mask and the pair of that layer type.
        """
        decoder = backbone.get_decoder()
        kind = "sliding" if self.mtp_layer_type == "sliding_attention" else "full"
        mask = packed_mask(decoder.config, hidden, position_ids, kind, always=self.block_reads_mask)
        rotary_table = hf_compat.rotary_embedding(decoder)
        if self.mtp_layer_type is None:
            rotary = rotary_table(hidden, position_ids)
        else:
            rotary = hf_compat.rotary_cos_sin(rotary_table, hidden, position_ids, self.mtp_layer_type)

        def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return block(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)

        return run

    def backbone_states(
        self,
        backbone: PreTrainedModel,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_idx: torch.Tensor | None,
        h0: PassesOn = "normed",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normed, h0)``: the backbone's last state after its final norm (the main loss reads it) and
        the state depth 1 reads (the same one, or the input of the final norm when ``h0 == "pre_norm"``)."""
        pre_norm: list[torch.Tensor] = []
        hook = None
        if h0 == "pre_norm":
            hook = self.final_norm(backbone).register_forward_pre_hook(lambda _, args: pre_norm.append(args[0]))
        try:
            out = backbone.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, use_cache=False, **self.packing_kwargs(seq_idx)
            )
        finally:
            if hook is not None:
                hook.remove()
        normed = out.last_hidden_state
        return normed, (pre_norm[-1] if pre_norm else normed)

    def final_norm(self, backbone: PreTrainedModel) -> nn.Module:
        """The backbone's final norm (read when ``h0 == "pre_norm"``)."""
        return hf_compat.final_norm(backbone.get_decoder())

    def describe_backend(self, device: torch.device) -> str | None:
        """One line naming the family's own kernels chosen for ``device`` and why (``None``: nothing to say).

        Raises ConfigError for a kernel choice that cannot run here, so the recipe stops at setup.
        """
        return None

    def serving_limits(self, hf_config: PretrainedConfig, mtp: MTPConfig) -> list[ServingLimit]:
        """What the serving engines cannot draft with in this MTP layout (nothing by default)."""
        return []

    def packing_kwargs(self, seq_idx: torch.Tensor | None) -> dict[str, Any]:
        """Extra forward kwargs that carry document boundaries to layers masks cannot reach (none by default)."""
        return {}

    def routed_top_k(self, hf_config: PretrainedConfig) -> int | None:
        """Experts each token is routed to (FLOP counting); ``None`` for a dense model."""
        return getattr(hf_config, "num_experts_per_tok", None)

    def block_kind(self, block: nn.Module) -> Any:
        """What makes two blocks interchangeable when a new depth is initialised from the backbone."""
        return type(block)

    def backbone_blocks(self, backbone: PreTrainedModel) -> list[nn.Module]:
        return list(backbone.get_decoder().layers)

    def attention_widths(self, module: nn.Module) -> tuple[int, int] | None:
        """``(query width, value width)`` of an attention module, whose score FLOPs grow with the sequence length
        (MFU counts them); ``None`` for any other module."""
        return projection_widths(module)

    def expert_modules(self, block: nn.Module) -> list[nn.Module]:
        """The modules of ``block`` that hold its routed experts (expert parallelism splits their rows).

        By default every module with ``num_experts`` whose own parameters all have that many rows, one of
        them at least 3-D: the merged ``[num_experts, out, in]`` weights (and ``[num_experts, out]`` biases)
        of transformers' experts modules. A router (one 2-D ``[num_experts, hidden]`` weight) is not one.
        """
        return transformers_experts(block)

    def donor_block(self, block: nn.Module, backbone: PreTrainedModel) -> nn.Module | None:
        """``mtp.init=from_scratch`` (and ``extend``'s new depths): the backbone block an MTP block starts from,
        the last one of its kind, or ``None`` (the block keeps its fresh initialisation)."""
        kind = self.block_kind(block)
        return next((b for b in reversed(self.backbone_blocks(backbone)) if self.block_kind(b) == kind), None)

    # ---- checkpoint keys ----------------------------------------------------------------------
    @abstractmethod
    def key_prefixes(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> KeyPrefixes:
        """``(prefix inside MTPDepth, prefix in the HF checkpoint)`` pairs for physical depth ``index``.

        HF-side names are in transformers' in-memory convention (e.g. merged expert tensors); the
        checkpoint layer applies transformers' own weight conversions to reach the on-disk names.
        """

    def tied_export_copies(self, hf_config: PretrainedConfig, mtp: MTPConfig) -> dict[str, str]:
        """Extra HF tensors written on export as copies of backbone tensors: ``{hf_name: backbone_key}``."""
        return {}

    def expert_index(self, disk_key: str) -> int | None:
        """The routed expert an on-disk tensor holds (``...experts.{e}...``), or ``None`` for any other tensor;
        a sharded load reads only its own experts' tensors."""
        match = _EXPERT_KEY.search(disk_key)
        return int(match.group(1)) if match else None


_EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")


def set_fields(config_json: dict[str, Any], fields: dict[str, Any]) -> None:
    """Set each of ``fields`` in a config.json dict; a value of ``None`` removes the field."""
    for key, value in fields.items():
        if value is None:
            config_json.pop(key, None)
        else:
            config_json[key] = value


def projection_widths(module: nn.Module, query: str = "q_proj") -> tuple[int, int] | None:
    """``(query.out_features, o_proj.in_features)`` of a module holding both linear layers, else ``None``."""
    q, o = getattr(module, query, None), getattr(module, "o_proj", None)
    if isinstance(q, nn.Linear) and isinstance(o, nn.Linear):
        return q.out_features, o.in_features
    return None


def transformers_experts(root: nn.Module) -> list[nn.Module]:
    """Transformers 5's routed-experts modules under ``root``: a module with ``num_experts`` whose own parameters
    all have that many rows, one of them at least 3-D (a router's one 2-D weight is not one)."""

    def holds_experts(module: nn.Module) -> bool:
        params = list(module.parameters(recurse=False))
        rows = getattr(module, "num_experts", None)
        return (
            isinstance(rows, int)
            and any(p.dim() >= 3 for p in params)
            and all(p.dim() >= 2 and p.shape[0] == rows for p in params)
        )

    return [m for m in root.modules() if holds_experts(m)]


def packed_mask(
    config: PretrainedConfig, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str = "full", always: bool = False
) -> Any:
    """The attention mask a transformers decoder builds for a packed row during training.

    With no 2D mask and no cache, transformers derives a block-diagonal mask from ``position_ids``
    that restart at 0 per document (sliding windows included for ``kind="sliding"``). ``always`` builds the mask
    tensor where sdpa's causal flag would do (``None``), as decoders whose indexer reads it do.
    """
    mask_fn = hf_compat.mask_function(kind, always=always)
    return mask_fn(
        config=config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids, **_no_cache(kind)
    )


@functools.cache
def _no_cache(kind: str) -> dict[str, None]:
    """``{name: None}`` for the KV-cache argument of ``kind``'s mask function (its name differs between releases),
    or ``{}`` when it defaults to None."""
    mask_fn = hf_compat.mask_function(kind)
    name = hf_compat.cache_keyword(mask_fn)
    return {} if inspect.signature(mask_fn).parameters[name].default is None else {name: None}


def sub_config(hf_config: PretrainedConfig, **fields: Any) -> PretrainedConfig:
    """A copy of ``hf_config`` with some fields changed, to build MTP blocks with the backbone's classes."""
    cfg = copy.deepcopy(hf_config)
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def num_nextn_layers(hf_config: PretrainedConfig) -> int:
    """D from ``num_nextn_predict_layers`` (DeepSeek-style configs), else its alias ``num_mtp_layers``."""
    value = getattr(hf_config, "num_nextn_predict_layers", None)
    if value is None:
        value = getattr(hf_config, "num_mtp_layers", None)
    return int(value or 0)


def ignore_trailing_layers(backbone: PreTrainedModel, num_hidden_layers: int, prefix: str = "model.layers.") -> None:
    """Mark every ``{prefix}{i}.`` with ``i >= num_hidden_layers`` as an MTP key the backbone does not load.

    Families that append their MTP depths as extra decoder layers (DeepSeek-V3, Step-3.5) need this so a
    checkpoint's MTP tensors are recognised as MTP keys whatever D the model is built with (D=0 included);
    transformers' own patterns are not enough (DeepSeek-V3 hard-codes layer 61).
    """
    below = "|".join(str(i) for i in range(num_hidden_layers)) or "(?!)"
    pattern = rf"^{re.escape(prefix)}(?!(?:{below})\.)\d+\."
    hf_compat.ignore_unexpected_keys(backbone, pattern)


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Serve each of ``family.model_types`` with ``family`` (:func:`mtp_recipes.families.get_family` finds it)."""
    for model_type in family.model_types:
        REGISTRY[model_type] = family
    return family
