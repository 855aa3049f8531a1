"""What a serving engine release does with an export's MTP weights, as data.

Each family lists one :class:`EngineRule` per engine release it was read against (``Family.engine_rules``), each
naming the engine files it was read from; ``python -m mtp_recipes.check`` evaluates an export against them, and
``serving.engine`` picks the drafting conventions the depths are trained with. The next engine release is one
more row per family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

ENGINES = ("vllm", "sglang")


@dataclass(frozen=True)
class ServingLimit:
    """An MTP layout that some engines cannot draft with as trained: ``engines`` are the ``serving.engine``
    values it concerns, so a run warns only about the engine it is served with."""

    engines: tuple[str, ...]
    line: str


Engine = Literal["vllm", "sglang"]
# One problem with an export's config.json for an engine, or None: (text config dict, MTP modules built) -> line
ConfigRule = Callable[[dict[str, Any], int], "str | None"]


@dataclass(frozen=True)
class Conventions:
    """The drafting math an engine runs: which backbone state feeds depth 1 (``normed``: after the final norm,
    ``pre_norm``: before it), what depth k hands to depth k + 1, and whether depth 1's embedding is zeroed at a
    document's position 0."""

    h0: Literal["normed", "pre_norm"]
    passes_on: Literal["normed", "pre_norm"]
    zero_first_embedding: bool

    def as_json(self) -> dict[str, Any]:
        return {"h0": self.h0, "passes_on": self.passes_on, "zero_first_embedding": self.zero_first_embedding}


# The drafting math most MTP drafters run: the final-normed backbone state in, the state after the depth's final
# norm passed on, the embedding at position 0 kept.
NORMED_CHAIN = Conventions(h0="normed", passes_on="normed", zero_first_embedding=False)


@dataclass(frozen=True)
class EngineRule:
    """One engine release's handling of one family's MTP export.

    ``modules_field`` is the text-config field whose value is the number of MTP modules the engine builds
    (``default_modules`` when the field is missing), or ``builds`` that number when the engine sets it itself
    whatever config.json says. Draft step k runs module ``(k - 1) % n`` when the engine selects modules by step
    (``multi_module``, and for vLLM only when ``n > 1`` and more than one token is drafted; ``multi_module_field``
    names another field that must be > 1 for it, as in vLLM 0.33), else module 1 at every step. ``conventions`` is
    ``None`` when the engine does not draft with these MTP weights at all. ``skipped`` names exported MTP tensors the
    engine never loads although it builds their module (a config field it reads decides), each with the reason.
    """

    engine: Engine
    version: str
    source: str
    conventions: Conventions | None
    modules_field: str = "num_nextn_predict_layers"
    builds: int | None = None
    default_modules: int = 0
    multi_module: bool = True
    multi_module_field: str | None = None
    config_rules: tuple[ConfigRule, ...] = ()
    skipped: Callable[[dict[str, Any], str], str | None] | None = None
    fails_on_missing: bool = True
    notes: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{'vLLM' if self.engine == 'vllm' else 'SGLang'} {self.version}"

    def modules(self, text_config: dict[str, Any]) -> int:
        """MTP modules the engine builds from ``text_config``."""
        if self.builds is not None:
            return self.builds
        return int(text_config.get(self.modules_field) or self.default_modules)

    def module_for_step(self, step: int, modules: int, num_speculative_tokens: int, text_config: dict) -> int:
        """The 0-based module draft step ``step`` (1-based) runs."""
        selects = self.multi_module and modules > 1 and num_speculative_tokens > 1
        if selects and self.multi_module_field is not None:
            selects = int(text_config.get(self.multi_module_field) or 0) > 1
        return (step - 1) % modules if selects else 0


def at_most(field_name: str, limit: int, why: str) -> ConfigRule:
    """A config rule: ``field_name`` (default 0) may be at most ``limit``."""

    def rule(text_config: dict[str, Any], modules: int) -> str | None:
        value = int(text_config.get(field_name) or 0)
        return None if value <= limit else f"{field_name}={value}: {why}"

    return rule


def required(field_name: str, why: str) -> ConfigRule:
    """A config rule: ``field_name`` must be present and non-zero."""

    def rule(text_config: dict[str, Any], modules: int) -> str | None:
        return None if text_config.get(field_name) else f"no {field_name}: {why}"

    return rule
