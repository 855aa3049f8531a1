"""LoRA (peft) on the backbone's linear layers, the MTP depths trained fully or through LoRA too.

The functions taking ``model`` take an :class:`~mtp_recipes.model.MTPModel` (its ``backbone``, ``mtp``, ``family``
and ``config``). peft's LoRA layers are injected into the model while it is built, before
FSDP2 shards it, so adapters are sharded, checkpointed (DCP) and resumed like any other parameter. A
wrapped linear ``X`` holds ``X.base_layer.weight`` and ``X.lora_A.default.weight`` /
``X.lora_B.default.weight``; :func:`checkpoint_names` maps the first back to ``X.weight`` and drops the
adapters, so loading and exporting see exactly the names of a model without LoRA. The merged export
writes ``W + scaling · B @ A`` per tensor on the writer; the adapter export writes peft's adapter files
next to the MTP tensors.

peft is an optional dependency: it is imported only when LoRA is on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from mtp_recipes.distributed.tensors import copy_into
from mtp_recipes.errors import ConfigError

ADAPTER = "default"  # peft's adapter name inside the model; peft's files drop it
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MTP_STEM = "mtp"  # the adapter export's MTP tensors: mtp.safetensors
BASE_LAYER = ".base_layer."
ADAPTER_PARAM = ".lora_"
PEFT_PREFIX = "base_model.model."  # peft's key prefix for a wrapped transformers model
ROOTS = ("backbone", "mtp")  # the MTPModel children LoRA may adapt


@dataclass(frozen=True)
class LoraSettings:
    """The ``lora`` config section with LoRA on (``rank > 0``)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: every linear layer LoRA can adapt
    mtp: Literal["full", "lora"] = "full"
    export: Literal["merged", "adapter"] = "merged"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_section(cls, section: Any) -> LoraSettings | None:
        """The settings of a ``lora`` config section (a mapping), or ``None`` when ``rank`` is 0 (LoRA off)."""
        values = dict(section)
        if not values.get("rank"):
            return None
        return cls(**values)


def require_peft() -> Any:
    """The peft module, or one ConfigError line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "lora.rank > 0 needs peft, which is not installed: pip install 'mtp_recipes[lora]' (or set lora.rank=0)"
        ) from None
    return peft


def is_adapter_name(key: str) -> bool:
    """Whether a parameter or state-dict key belongs to a LoRA adapter (not to the model it adapts)."""
    return ADAPTER_PARAM in key


def checkpoint_names(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict under the names a model without LoRA has: adapters dropped, ``.base_layer.`` removed."""
    return {k.replace(BASE_LAYER, "."): v for k, v in state.items() if not is_adapter_name(k)}


def _adaptable(module: nn.Module, name: str, heads: set[int], skipped: tuple[str, ...]) -> bool:
    """A linear layer whose weight is a parameter multiplied only through the layer's own forward.

    Output heads are excluded (the loss reads their weight directly), and so are the family's
    ``lora_skipped`` layers (kernels that read the weight directly); a weight held as a buffer is frozen.
    """
    return (
        isinstance(module, nn.Linear)
        and isinstance(module.weight, nn.Parameter)
        and id(module.weight) not in heads
        and name.rsplit(".", 1)[-1] not in skipped
    )


def target_modules(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The full names (inside ``model``) of the linear layers to adapt.

    Default: every adaptable linear layer of the backbone (and of the MTP depths with ``mtp: lora``).
    Named targets match a module's full name or its last dotted parts, like peft's ``target_modules``;
    one that matches no adaptable layer is one ConfigError line.
    """
    roots = tuple(f"{root}." for root in (ROOTS if settings.mtp == "lora" else ROOTS[:1]))
    heads = {id(model.backbone.get_output_embeddings().weight)}
    if model.family.head == "per_depth":
        heads |= {id(w) for w in model.mtp_heads()}
    skipped = model.family.lora_skipped
    layers = {n: m for n, m in model.named_modules() if n.startswith(roots)}
    adaptable = sorted(n for n, m in layers.items() if _adaptable(m, n, heads, skipped))
    if settings.target_modules is None:
        return adaptable
    chosen: set[str] = set()
    for target in settings.target_modules:
        hits = [n for n in adaptable if n == target or n.endswith(f".{target}")]
        if not hits:
            where = "backbone and MTP depths" if settings.mtp == "lora" else "backbone (lora.mtp=full)"
            names = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
            raise ConfigError(
                f"lora.target_modules: {target!r} matches no linear layer LoRA can adapt in the {where}; "
                f"adaptable layers end in {names} (output heads and {list(skipped) or 'no other'} layers are left out)"
            )
        chosen.update(hits)
    return sorted(chosen)


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject LoRA layers, in the master dtype (torch's default dtype here); mark what trains; return the targets.

    peft works on a plain container of the backbone and the MTP stack, not on the transformers model
    itself: on a transformers model peft rewrites some targets for its own v4 -> v5 MoE conversion
    (DeepSeek-V3's dense ``gate_proj`` would become the routed experts). Trainable afterwards: the
    adapters, and every MTP parameter with ``mtp: full``.
    """
    peft = require_peft()
    targets = target_modules(model, settings)
    if settings.export == "adapter":
        check_peft_loads(model, settings, targets)
    config = _lora_config(peft, settings, targets)
    peft.inject_adapter_in_model(config, nn.ModuleDict({root: getattr(model, root) for root in ROOTS}))
    master = torch.get_default_dtype()  # peft casts adapters to their base layer's (frozen) dtype
    for name, param in model.named_parameters():
        adapter = is_adapter_name(name)
        if adapter and param.dtype != master:
            param.data = param.data.to(master)
        param.requires_grad_(adapter or (settings.mtp == "full" and name.startswith("mtp.")))
    return targets


def _lora_config(peft: Any, settings: LoraSettings, targets: list[str], **fields: Any) -> Any:
    return peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        **fields,
    )


def _backbone_targets(targets: list[str]) -> list[str]:
    """The backbone's targets, named inside the backbone (as peft's adapter files name them)."""
    prefix = f"{ROOTS[0]}."
    return sorted(t.removeprefix(prefix) for t in targets if t.startswith(prefix))


def check_peft_loads(model: nn.Module, settings: LoraSettings, targets: list[str]) -> None:
    """``export: adapter`` only where peft's loader adapts exactly the layers trained: one ConfigError line else.

    peft rewrites some targets when it loads an adapter onto a transformers model (its v4 -> v5 MoE
    conversion: DeepSeek-V3's dense ``gate_proj`` becomes the routed experts), which would load the adapter
    into other layers without an error. The check injects the adapter's config into a meta-device copy of
    the backbone, as the loader does, and compares.
    """
    peft = require_peft()
    config = _lora_config(peft, settings, _backbone_targets(targets))
    with torch.device("meta"):
        probe = model.family.build_backbone(copy.deepcopy(model.config))  # building may write to a config
    peft.inject_adapter_in_model(config, probe, low_cpu_mem_usage=True)
    loaded = {n.removesuffix(".base_layer") for n, _ in probe.named_modules() if n.endswith(".base_layer")}
    wrong = sorted(loaded ^ set(_backbone_targets(targets)))
    if wrong:
        raise ConfigError(
            f"lora.export=adapter: peft's adapter loader would not put the adapters where they were trained on this "
            f"{model.config.model_type} model (it remaps its targets; e.g. {wrong[0]}): use lora.export=merged"
        )


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped layers by full name, in module order."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def init_adapters(model: nn.Module, seed: int) -> None:
    """Initialise every adapter as peft does (A ~ U(±1/√in), B = 0) from ``seed``, not from the global RNG.

    The values are drawn whole, in module order, and each rank keeps its shard, so a sharded or meta-built
    model starts exactly where a one-process model does.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            bound = 1 / math.sqrt(a.shape[1])
            copy_into(a, torch.empty(a.shape).uniform_(-bound, bound, generator=generator))
            copy_into(b, torch.zeros(b.shape))


def merge_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{checkpoint name of an adapted weight: (A, B, scaling)}``: what the merged export adds to it."""
    return {
        f"{name}.weight": (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER])
        for name, layer in adapted_layers(model).items()
    }


def merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling · B @ A`` in at least float32: the export rounds it once, to the tensor's on-disk dtype."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dtype) + scaling * (b.to(dtype) @ a.to(dtype))


def peft_key(name: str) -> str:
    """An adapter parameter of the backbone under the key peft's adapter files use."""
    return PEFT_PREFIX + name.removeprefix(f"{ROOTS[0]}.").replace(f".{ADAPTER}.", ".")


def gather_adapter(
    model: nn.Module, writer: bool, gather: Callable[[torch.Tensor, bool], torch.Tensor | None]
) -> dict[str, torch.Tensor] | None:
    """The backbone's adapter tensors, whole, under peft's keys on the writer (``None`` elsewhere).

    ``gather`` is the export's per-tensor gather: a collective every rank joins in the same order.
    """
    tensors = {}
    for name, param in model.named_parameters():
        if is_adapter_name(name) and name.startswith(f"{ROOTS[0]}."):
            full = gather(param, writer)
            if writer:
                tensors[peft_key(name)] = full.detach().contiguous().cpu()
    return tensors if writer else None


def adapter_writer(
    settings: LoraSettings, tensors: dict[str, torch.Tensor], targets: list[str], base: str | None
) -> Callable[[Path], None]:
    """A function writing peft's ``adapter_model.safetensors`` and ``adapter_config.json`` into a directory."""
    peft = require_peft()
    config = _lora_config(
        peft, settings, _backbone_targets(targets), task_type="CAUSAL_LM", base_model_name_or_path=base
    )

    def write(directory: Path) -> None:
        save_file(dict(sorted(tensors.items())), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config.save_pretrained(str(directory))

    return write
