"""Checks a Hydra command line before Hydra sees it, so a mistyped key or recipe name is one line that names the fix.

Hydra reports an unknown override key or config name in a multi-line block with status 1, and its hint for an
unknown key (``+key=value``) appends the typo instead of fixing it. The rules checked here are Hydra's own: a
key must exist in the composed config (Hydra composes in struct mode), a group option must be a file of the
group, and ``--config-name`` must be a config of ``configs/``. What passes goes to Hydra unchanged.
"""

from __future__ import annotations

import difflib
import shutil
import sys
from functools import partial
from pathlib import Path

from hydra.core.override_parser.types import ValueType
from omegaconf import DictConfig

from mtp_recipes.config import CONFIG_DIR

# Hydra flags that take a value in the next argument.
_VALUE_FLAGS = {"--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c", "--package", "-p", "--experimental-rerun"}


def discard_unused_run_dir(run_dir: Path, command: str) -> None:
    """Remove a run dir holding only what Hydra wrote (``.hydra/``, ``<command>.log``), and the empty directories
    Hydra made above it (``runs/<date>/``): a rejected command line leaves nothing behind."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", f"{command}.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)
        cwd = Path.cwd().resolve()
        for parent in run_dir.resolve().parents:
            if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()


def config_names() -> list[str]:
    """The configs ``--config-name`` accepts: the recipes and the default job (``finetune``)."""
    return sorted(p.stem for p in Path(CONFIG_DIR).glob("*.yaml"))


def recipe_names() -> list[str]:
    """The published recipes: every config but the default debug job and ``regenerate``'s."""
    return [n for n in config_names() if n not in ("finetune", "regenerate")]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_command_line(argv: list[str], command: str, default_config: str) -> None:
    """Print ``--help``, or exit with status 2 and one ``error:`` line for a key or name Hydra would refuse."""
    if "--help" in argv or "-h" in argv:
        print(usage(command, default_config))
        sys.exit(0)
    config_name, overrides, own_config_dir = default_config, [], False
    multirun = "-m" in argv or "--multirun" in argv
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--config-name", "-cn"):
            config_name = args.pop(0) if args else ""
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg in _VALUE_FLAGS or arg.split("=", 1)[0] in _VALUE_FLAGS:
            own_config_dir |= arg.split("=", 1)[0] in ("--config-path", "-cp", "--config-dir", "-cd")
            if "=" not in arg and args:
                args.pop(0)
        elif not arg.startswith("-"):
            overrides.append(arg)
    if own_config_dir:  # the user's own configs: Hydra checks them
        return
    error = _config_name_error(config_name) or _override_error(config_name, overrides, multirun)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def usage(command: str, default_config: str) -> str:
    groups = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
    lines = [
        f"usage: python -m mtp_recipes.{command} [--config-name RECIPE] [-m] [key=value ...]",
        "",
        f"recipes (--config-name): {', '.join(recipe_names())}; default: {default_config}",
        *(f"  {group}=: {', '.join(group_options(group))}" for group in groups),
        "",
        "Any field of the config is overridable (docs/config.md), e.g. mtp.loss_scaling_factor=0.3;",
        "-m with comma-separated values sweeps them (mtp.loss_scaling_factor=0.05,0.1,0.3).",
        "Hydra's own options: --hydra-help; the composed config without running: --cfg job.",
    ]
    return "\n".join(lines)


def _config_name_error(name: str) -> str | None:
    names = config_names()
    if name.removesuffix(".yaml") in names:
        return None
    recipes = ", ".join(recipe_names())
    hint = did_you_mean(name, names)
    return f"--config-name {name}: no such recipe{hint} (recipes: {recipes}; the debug job: finetune)"


def _override_error(config_name: str, overrides: list[str], multirun: bool) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, parsed = OverridesParser.create(), []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except OverrideParseException as e:
            return f"cannot read {override!r}: {str(e).splitlines()[0]} (the form is key=value; a sweep: -m key=a,b)"
    sweep = next((o.input_line for o in parsed if o.is_sweep_override()), None)
    if sweep and not multirun:
        return f"{sweep} is a sweep: add -m (--multirun) to run one job per value"
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    group_choices, value_keys = [], []
    for o in parsed:
        key = o.key_or_group
        if key in groups and not o.is_delete():
            if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
                continue
            options = group_options(key)
            chosen = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for option in chosen:
                if option not in options:
                    return (
                        f"{key}={option}: no such option in group {key}{did_you_mean(str(option), options)} "
                        f"(options: {', '.join(options)})"
                    )
            group_choices.append(f"{key}={chosen[0]}")
        elif not (o.is_add() or o.is_force_add()) and key.split(".")[0] != "hydra":
            value_keys.append(key)
    if not value_keys:
        return None
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=group_choices)
    return next((e for e in map(partial(_missing_key, cfg), value_keys) if e), None)


def _missing_key(cfg: DictConfig, key: str) -> str | None:
    """Hydra's struct rule: every part of the key must exist; the fix keeps the parts that do."""
    node: DictConfig | None = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if node is None:  # below a list, a value or a null section: Hydra checks it
            return None
        if part not in node.keys():
            keys = [str(k) for k in node.keys()]
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
            if close:
                fixed = ".".join([*parts[:i], close[0], *parts[i + 1 :]])
                return f"{key}: no such config key; did you mean {fixed}?"
            where = ".".join(parts[:i]) or "the top level"
            return f"{key}: no such config key (keys of {where}: {', '.join(keys)})"
        child = node._get_node(part)
        node = child if isinstance(child, DictConfig) and not child._is_none() else None
    return None
