"""Every use of a transformers internal (a private name, or a class change of its modules), in one place.

Each function below is one touch point and says why no public API serves. ``tests/test_hf_compat.py``
has one test per touch point whose failure message names it, so a new transformers release shows in one
test run exactly what moved.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from packaging.requirements import Requirement
from packaging.version import Version
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    get_model_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

logger = logging.getLogger("mtp_recipes")


def tested_transformers_range() -> str | None:
    """The transformers versions the suite passed on: the range this package declares, from its metadata.

    ``None`` when the package runs from a source tree that was never installed (no metadata to read).
    """
    try:
        requirements = importlib.metadata.requires("mtp_recipes") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "transformers" and requirement.marker is None:
            return str(requirement.specifier)
    return None


def warn_if_untested_transformers() -> bool:
    """Log one warning line when the installed transformers is outside the tested range; ``True`` if it is.

    A user may install a newer transformers on purpose; the run goes on, but the private names fenced
    here are exactly what a new release moves, so they should know.
    """
    tested = tested_transformers_range()
    installed = importlib.metadata.version("transformers")
    if tested is None or Version(installed) in Requirement(f"transformers{tested}").specifier:
        return False
    logger.warning(
        "transformers %s is outside the range mtp_recipes was tested on (transformers%s); "
        "run `python -m pytest -q` from the repository to check it",
        installed,
        tested,
    )
    return True


# The logger of transformers' kernel dispatch, which advises installing mamba_ssm / causal_conv1d (CUDA-only)
# whenever a Mamba mixer runs its reference PyTorch path; on CPU that advice cannot be followed.
KERNEL_FALLBACK_LOGGER = "transformers.integrations.hub_kernels"


def swap_class(module: nn.Module, cls: type[nn.Module]) -> None:
    """Make ``module`` an instance of ``cls``, a subclass of its own class that adds no state.

    transformers builds the backbone's modules itself; a subclass swapped in afterwards changes one method
    while parameters, state-dict keys, FSDP wrapping and transformers' ``isinstance``-based weight init
    all see the same module.
    """
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls


# ---- names that differ between the supported transformers releases ---------------------------------------
# transformers 5.24 renamed the KV-cache argument (``past_key_values``, and Nemotron-H's ``cache_params``) to
# ``cache``; the releases this package supports (5.19 on) have one or the other.
_CACHE_NAMES = ("cache", "past_key_values", "cache_params")


def cache_keyword(fn: Callable[..., Any]) -> str:
    """The keyword under which ``fn`` (a decoder's forward, a mask function) takes the KV cache."""
    params = inspect.signature(fn).parameters
    for name in _CACHE_NAMES:
        if name in params:
            return name
    raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes no cache argument")


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a transformers layer was called with by keyword, under either release's name (None: none)."""
    return next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)


# ---- config and model attributes ------------------------------------------------------------------
def set_implementations(config: PretrainedConfig, attention: str | None, experts: str | None) -> None:
    """Choose the attention / MoE-experts kernels on a config before any module is built from it.

    ``from_pretrained(attn_implementation=...)`` is public but applies to the model it builds only; the MTP
    blocks are built from copies of the config, and read these private fields.
    """
    if attention is not None:
        config._attn_implementation = attention
    if experts is not None:
        config._experts_implementation = experts


def decode_special_floats(raw: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict with transformers' tagged non-JSON floats (``{"__float__": "Infinity"}``) decoded.

    ``from_pretrained`` does this on read; building a config from a dict we read ourselves needs the same.
    """
    return PretrainedConfig._decode_special_floats(raw)


def attention_implementation(config: PretrainedConfig) -> str:
    """The attention kernel a module built from ``config`` dispatches to (no public reader exists)."""
    return config._attn_implementation


def unsupported_attention(error: ValueError) -> bool:
    """Whether ``error`` is transformers refusing the requested attention kernel for a model class (it says so only
    in the message)."""
    return "does not support an attention implementation" in str(error)


def init_module_weights(model: PreTrainedModel, module: nn.Module) -> None:
    """transformers' own initialisation of one ``module`` (built outside ``model``) with ``model``'s rules.

    The public ``init_weights`` walks the whole model and skips modules it considers initialised; MTP depths
    and meta-built modules need the per-module rule.
    """
    model._init_weights(module)


def has_non_persistent_buffers(module: nn.Module) -> bool:
    """Whether ``module`` itself holds buffers left out of its state dict (rotary tables): torch's private set.

    A meta-built model must recompute exactly these, since no checkpoint holds them.
    """
    return bool(module._non_persistent_buffers_set)


def unexpected_key_patterns(model: PreTrainedModel) -> list[str]:
    """Regexes of checkpoint keys transformers drops on load for ``model`` (its MTP tensors, for one).

    Our loader reads exactly those keys itself, so it needs transformers' own list, not a copy of it.
    """
    return list(model._keys_to_ignore_on_load_unexpected or [])


def ignore_unexpected_keys(model: PreTrainedModel, pattern: str) -> None:
    """Add ``pattern`` to the keys transformers drops on load (and :func:`unexpected_key_patterns` reports).

    For MTP layers appended after the backbone's, where transformers' own pattern names one layer index.
    """
    model._keys_to_ignore_on_load_unexpected = [*unexpected_key_patterns(model), pattern]


def fp32_module_names(model: PreTrainedModel) -> tuple[str, ...]:
    """Name fragments of tensors transformers keeps in float32 whatever the model dtype (MoE gate biases)."""
    return tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())


def keep_in_fp32(model: PreTrainedModel, names: list[str]) -> None:
    """Mark tensors whose names contain one of ``names`` to stay float32 (as transformers does for its own)."""
    model._keep_in_fp32_modules_strict = list(names)


def enable_block_checkpointing(block: nn.Module, checkpoint_fn: Callable[..., Any]) -> None:
    """Recompute ``block`` (a transformers ``GradientCheckpointingLayer``) in backward with ``checkpoint_fn``.

    The public ``gradient_checkpointing_enable`` works on a whole ``PreTrainedModel``; the MTP blocks sit
    outside the backbone, so each layer's own switch is set.
    """
    if not hasattr(block, "gradient_checkpointing"):
        raise ValueError(f"{type(block).__name__} does not support activation checkpointing")
    block.gradient_checkpointing = True
    block._gradient_checkpointing_func = checkpoint_fn


# ---- modules and helpers of transformers' decoders ------------------------------------------------------
def mask_function(kind: str = "full", always: bool = False) -> Callable[..., Any]:
    """transformers' mask builder for ``full`` or ``sliding`` (window) attention, as its decoders call them.

    Its own module, not the top-level API; an MTP block must get exactly the mask the backbone's layers get.
    ``always``: the mask tensor even where sdpa's causal flag would stand for it (``None``), as the decoders whose
    indexer scores keys under the mask ask for it (``allow_is_causal_skip=False``).
    """
    fn = {"full": create_causal_mask, "sliding": create_sliding_window_causal_mask}[kind]
    return functools.partial(fn, allow_is_causal_skip=False) if always else fn


def rotary_embedding(decoder: nn.Module) -> nn.Module:
    """The decoder's rotary module (``rotary_emb``), called as ``(hidden, position_ids) -> (cos, sin)``."""
    return decoder.rotary_emb


def final_norm(decoder: nn.Module) -> nn.Module:
    """The decoder's last norm (``norm``), whose input is the state some engines feed the first MTP depth."""
    return decoder.norm


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation function of a config's ``hidden_act`` name."""
    return ACT2FN[name]


def causal_lm_output(logits: torch.Tensor, outputs: Any) -> Any:
    """A causal LM's forward output (what ``generate`` reads): ``logits`` and the decoder output's cache and
    states, for a causal-LM class of ours around a transformers decoder."""
    carried = {k: v for k, v in outputs.items() if k in CausalLMOutputWithPast.__dataclass_fields__}
    return CausalLMOutputWithPast(logits=logits, **carried)


def declare_tied_weights(cls: type[PreTrainedModel], tied: dict[str, str]) -> None:
    """Make a causal-LM class of ours tie ``{target: source}`` weights as transformers' own classes do."""
    cls._tied_weights_keys = tied


# ---- routed experts ------------------------------------------------------------------------------
# transformers' experts modules hold merged weights ``[num_experts, ...]`` and compute
# ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``; a class decorated
# with ``use_experts_implementation`` dispatches that call to the function its config's
# ``_experts_implementation`` names in ``ExpertsInterface``, called as ``fn(module, *args)``.
ExpertsFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def uses_experts_interface(experts: nn.Module) -> bool:
    """Whether ``experts``'s class dispatches its forward through ``ExpertsInterface`` (Step-3.5's does not).

    The decorator keeps the class's own forward as ``__wrapped__`` and gives the module its config.
    """
    return hasattr(type(experts).forward, "__wrapped__") and hasattr(experts, "config")


def experts_function(experts: nn.Module) -> ExpertsFunction:
    """What ``experts`` computes with now, as a function of (module, hidden, top_k_index, top_k_weights).

    For a dispatching class, the implementation its config names (``eager``: the class's own forward);
    otherwise the class's forward. No public reader of the chosen implementation exists.
    """
    own = inspect.unwrap(type(experts).forward)
    if not uses_experts_interface(experts):
        return own
    return ALL_EXPERTS_FUNCTIONS.get_interface(experts.config._experts_implementation, own)


def route_experts(experts: nn.Module, name: str, function: ExpertsFunction) -> None:
    """Make ``experts`` compute with ``function``: registered in ``ExpertsInterface`` as ``name`` and chosen
    on the module's config; for a class without that seam, a subclass whose forward is ``function``.

    The config is the one the module was built with (shared by the backbone's experts modules, one copy per
    MTP depth), so every experts module built from it switches: call this for all of them.
    """
    if uses_experts_interface(experts):
        ExpertsInterface.register(name, function)
        experts.config._experts_implementation = name
        return
    swap_class(experts, _routed_class(type(experts), function))


@functools.cache
def _routed_class(cls: type[nn.Module], function: ExpertsFunction) -> type[nn.Module]:
    def forward(self: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return function(self, hidden, top_k_index, top_k_weights)

    return type(f"Routed{cls.__name__}", (cls,), {"forward": forward})


class LocalExperts:
    """An experts module as seen by an experts function when only some of its experts are here.

    transformers' experts functions read the merged weights and ``num_experts`` as attributes of the module
    they are given and call its own methods (``_apply_gate``, ``act_fn``): this stand-in answers the weights
    with the given rows (experts renumbered from 0) and everything else from the module.
    """

    def __init__(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self.__dict__.update(weights)
        self.num_experts = next(iter(weights.values())).shape[0]
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


# ---- rotary embeddings with one table per layer type --------------------------------------------
def rotary_layer_types(rotary: nn.Module) -> set[str]:
    """The layer types (``full_attention``, ``sliding_attention``) a per-type rotary module has tables for."""
    return set(rotary.rope_type)


def rotary_cos_sin(
    rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of a per-type rotary module for ``layer_type``: its forward takes the type third."""
    return rotary(hidden, position_ids, layer_type)


# ---- checkpoint weight conversions ----------------------------------------------------------------
def attached_weight_conversions(model: PreTrainedModel) -> list[Any] | None:
    """Conversions a model carries itself (they win over the registry, as in transformers' own saver)."""
    return getattr(model, "_weight_conversions", None)


def attach_weight_conversions(model: PreTrainedModel, conversions: list[Any]) -> None:
    """Make ``model`` load and save with ``conversions`` instead of its class's registered ones."""
    model._weight_conversions = conversions


def model_weight_conversions(model: PreTrainedModel) -> list[Any]:
    """transformers' on-disk <-> in-memory conversions for ``model``'s class."""
    return get_model_conversion_mapping(model)


def checkpoint_conversions(model_type: str) -> list[Any]:
    """The conversions transformers registers for ``model_type`` checkpoints."""
    return get_checkpoint_conversion_mapping(model_type)


def register_checkpoint_conversions(class_name: str, conversions: list[Any]) -> None:
    """Register ``conversions`` for a model class of ours (a class transformers does not ship)."""
    register_checkpoint_conversion_mapping(class_name, conversions, overwrite=True)


def rename_key(key: str, renamings: list[Any], converters: list[Any]) -> tuple[str, str | None]:
    """An on-disk key's in-memory name and the converter pattern it matched (``None``: a plain rename)."""
    return rename_source_key(key, renamings, converters)


def revert_conversions(model: PreTrainedModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory names/layouts -> on-disk ones, exactly as transformers' ``save_pretrained`` writes them."""
    return revert_weight_conversion(model, state_dict)


warn_if_untested_transformers()  # once, when the package first loads transformers

__all__ = ["WeightConverter", "WeightRenaming", "dot_natural_key"]
