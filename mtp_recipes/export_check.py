"""Will a serving engine draft with every trained MTP weight of an export? Answered offline from its files.

For each engine release a family has a rule for (:mod:`mtp_recipes.engines`): whether the engine's config parsing
accepts config.json, how many MTP modules it builds and which one each draft step runs, whether every tensor
those modules load is in the files with the right shape and dtype, which exported MTP tensors it would never use,
and whether it runs the drafting conventions the depths were trained with (``mtp_recipes.json`` records them).
Nothing is loaded but the files' headers; the expected tensors come from the model the config describes, built
on the meta device.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtp_recipes import hf_compat
from mtp_recipes.checkpoint.convert import disk_groups, from_disk
from mtp_recipes.checkpoint.hf import TensorReader, read_config_dict, tensor_files
from mtp_recipes.checkpoint.load import examples
from mtp_recipes.checkpoint.nesting import find_nesting
from mtp_recipes.engines import ENGINES, EngineRule
from mtp_recipes.model import MTPModel
from mtp_recipes.model_checkpoint import SERVING_RECORD, hf_state

log = logging.getLogger("mtp_recipes")


@dataclass
class EngineReport:
    """One engine release's verdict on an export: ``problems`` make it fail or draft wrongly; ``notes`` inform."""

    engine: str
    source: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """One line: the engine, the verdict and the first problem."""
        if self.ok:
            return f"{self.engine}: ok"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.engine}: FAIL: {self.problems[0]}{more}"


@dataclass
class Export:
    """What the checks read of an export directory."""

    directory: Path
    text_config: dict[str, Any]
    model: MTPModel  # built on the meta device from config.json
    record: dict[str, Any] | None
    files: dict[str, torch.Tensor]  # in-memory HF name -> meta tensor as stored (shape, dtype)
    disk_names: dict[str, list[str]]  # in-memory HF name -> its on-disk keys
    expected: dict[int, dict[str, torch.Tensor]]  # module -> in-memory HF name -> meta tensor the model has
    unclaimed: list[str]  # MTP tensors in the files that no module of the config holds
    dtype: torch.dtype  # the export's tensor dtype (its backbone's)


def read_export(directory: str | Path) -> Export:
    directory = Path(directory)
    raw = read_config_dict(directory)
    raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    with torch.device("meta"):
        model = MTPModel.from_config(raw)
    text = raw.get("text_config", raw) if model.text_config is not model.config else raw
    record_file = directory / SERVING_RECORD
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    files = tensor_files(directory)
    reader = TensorReader(files)
    nesting = find_nesting(model.family.checkpoint_nestings, files)
    meta = {name: reader.meta(k) for k in reader.keys() if (name := nesting.to_memory(k)) is not None}
    in_memory = from_disk(model.backbone, meta)
    keymap = model.keymap()
    expected: dict[int, dict[str, torch.Tensor]] = {}
    state = hf_state(model, keep_vars=True)
    copies = model.family.tied_export_copies(model.text_config, model.mtp_config)
    for name, tensor in [*state.items(), *((c, state[s]) for c, s in copies.items())]:
        if keymap.is_mtp(name):
            expected.setdefault(int(keymap.from_hf(name).split(".")[2]), {})[name] = tensor
    claimed = {name for module in expected.values() for name in module}
    patterns = [re.compile(p) for p in hf_compat.unexpected_key_patterns(model.backbone)]
    unclaimed = sorted(
        k for k in in_memory if k not in claimed and (keymap.is_mtp(k) or any(p.search(k) for p in patterns))
    )
    backbone = [t.dtype for k, t in meta.items() if not keymap.is_mtp(k) and t.is_floating_point()]
    return Export(
        directory=directory,
        text_config=text,
        model=model,
        record=record,
        files=in_memory,
        disk_names=disk_groups(model.backbone, list(meta)),
        expected=expected,
        unclaimed=unclaimed,
        dtype=Counter(backbone).most_common(1)[0][0] if backbone else torch.float32,
    )


def log_checks(directory: Path, serving_engine: str) -> None:
    """One log line per engine release for a new export; a failure is a warning only for ``serving_engine``,
    the engine the run is served with (the others may never serve it)."""
    for engine in ENGINES:
        for report in check_export(directory, (engine,)):
            warn = engine == serving_engine and not report.ok
            (log.warning if warn else log.info)("check: %s", report.line())


def check_export(
    directory: str | Path, engines: tuple[str, ...] = ENGINES, num_speculative_tokens: int | None = None
) -> list[EngineReport]:
    """One report per engine release of ``engines`` the export's family has a rule for, newest first."""
    export = read_export(directory)
    rules = [r for r in export.model.family.engine_rules if r.engine in engines]
    return [check_rule(export, rule, num_speculative_tokens) for rule in rules]


def check_rule(export: Export, rule: EngineRule, num_speculative_tokens: int | None) -> EngineReport:
    report = EngineReport(rule.name, rule.source)
    family = export.model.family
    if rule.conventions is None:
        held = sum(len(m) for m in export.expected.values())
        report.problems.append(f"does not draft with {family.name} MTP weights ({held} exported MTP tensors unused)")
        return report
    modules = rule.modules(export.text_config)
    for config_rule in rule.config_rules:
        problem = config_rule(export.text_config, modules)
        if problem is not None:
            report.problems.append(f"config.json: {problem}")
    if modules == 0:
        report.problems.append(f"config.json has no {rule.modules_field}: the engine builds no MTP module")
        return report
    _check_tensors(export, rule, modules, report)
    _check_steps(export, rule, modules, num_speculative_tokens, report)
    _check_conventions(export, rule, report)
    return report


def _check_tensors(export: Export, rule: EngineRule, modules: int, report: EngineReport) -> None:
    """Every tensor of the modules the engine builds: present, of the model's shape and the export's dtype; and
    the exported MTP tensors the engine never loads."""
    fp32 = hf_compat.fp32_module_names(export.model.backbone)
    missing, wrong, skipped = [], [], []
    for module in range(modules):
        for name, tensor in export.expected.get(module, {}).items():
            stored = export.files.get(name)
            if stored is None:
                missing.append(name)
                continue
            dtype = torch.float32 if any(n in name for n in fp32) else export.dtype
            if stored.shape != tensor.shape or stored.dtype != dtype:
                wrong.append(f"{name} {tuple(stored.shape)} {stored.dtype} (expected {tuple(tensor.shape)} {dtype})")
            for disk in export.disk_names.get(name, [name]):
                reason = rule.skipped(export.text_config, disk) if rule.skipped is not None else None
                if reason is not None:
                    skipped.append((disk, reason))
    if missing:
        effect = "fails to load" if rule.fails_on_missing else "drafts with random weights in their place"
        report.problems.append(f"{len(missing)} MTP tensor(s) missing ({examples(missing, 3)}): the engine {effect}")
    if wrong:
        report.problems.append(f"MTP tensor(s) of the wrong shape or dtype: {examples(wrong, 2)}")
    if skipped:
        keys = [k for k, _ in skipped]
        report.problems.append(f"trained MTP tensors the engine never loads ({examples(keys, 2)}): {skipped[0][1]}")
    beyond = [n for m, tensors in export.expected.items() if m >= modules for n in tensors] + export.unclaimed
    if beyond:
        report.problems.append(
            f"{len(beyond)} exported MTP tensor(s) of modules the engine does not build ({examples(beyond, 2)}): "
            + (
                f"it builds {modules} whatever config.json says"
                if rule.builds is not None
                else f"config.json's {rule.modules_field}={modules} does not cover them"
            )
        )


def _check_steps(
    export: Export, rule: EngineRule, modules: int, num_speculative_tokens: int | None, report: EngineReport
) -> None:
    """Which module each draft step runs, against the steps each module was trained for."""
    record = export.record
    trained_depths = int(record["num_layers"]) if record else modules
    repeated = bool(record and record.get("use_repeated_layer") and record.get("physical_layers") == 1)
    steps = num_speculative_tokens or trained_depths
    used = [rule.module_for_step(k, modules, steps, export.text_config) for k in range(1, steps + 1)]
    report.notes.append(f"{steps} draft step(s) run module(s) {[m + 1 for m in used]} of {modules} built")
    if record is None:
        report.notes.append(f"no {SERVING_RECORD}: assuming module i was trained for draft step i")
    for step, module in enumerate(used, start=1):
        trained = range(1, trained_depths + 1) if repeated else (module + 1,)
        if step > trained_depths:
            report.notes.append(f"step {step} reuses module {module + 1} beyond the {trained_depths} trained step(s)")
        elif step not in trained:
            report.problems.append(
                f"draft step {step} runs module {module + 1}, trained for step {module + 1} only (train one module for "
                "every step with mtp.use_repeated_layer=true, or draft fewer steps)"
            )


def _check_conventions(export: Export, rule: EngineRule, report: EngineReport) -> None:
    """The drafting math the engine runs against the one the depths were trained with."""
    if export.record is None:
        return
    trained, runs = export.record["conventions"], rule.conventions.as_json()
    differ = [f"{k} trained {trained.get(k)!r}, runs {runs[k]!r}" for k in runs if trained.get(k) != runs[k]]
    if differ:
        engine = export.record.get("serving_engine")
        report.problems.append(
            f"drafting conventions differ ({'; '.join(differ)}): the depths were trained for serving.engine={engine}"
        )


def describe(directory: str | Path, reports: list[EngineReport]) -> str:
    """The reports as text: one line per engine, its problems and notes indented below."""
    lines = [f"{directory}:"]
    for report in reports:
        lines.append(report.line())
        lines += [f"    problem: {p}" for p in report.problems] + [f"    note: {n}" for n in report.notes]
        lines.append(f"    read from: {report.source}")
    return "\n".join(lines)
