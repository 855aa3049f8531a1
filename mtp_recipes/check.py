"""``python -m mtp_recipes.check DIR [--engine vllm|sglang|all] [--num-speculative-tokens K]``.

Tells, before a deployment, whether each serving engine release (vLLM 0.34 and 0.33, SGLang 0.5.23) will draft
with every trained MTP weight of the export in ``DIR`` (:mod:`mtp_recipes.export_check`): offline, with no GPU
and no engine installed. Prints one line per engine release and what it found; exits with status 1 when an engine
would fail or draft with weights that are missing or were trained for another step, 2 on unreadable input.
``DIR`` may be a run directory: its ``final/`` export is checked, else its newest ``checkpoints/step_N/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtp_recipes.checkpoint.locate import run_dir_export
from mtp_recipes.engines import ENGINES
from mtp_recipes.errors import MTPRecipesError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="an export (config.json + safetensors), or a run directory with final/")
    parser.add_argument("--engine", choices=[*ENGINES, "all"], default="all")
    parser.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                        help="draft tokens per step (default: the depths trained)")  # fmt: skip
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    export = None if (directory / "config.json").exists() else run_dir_export(directory)
    if export is not None:
        print(f"{directory} is a run directory: checking its export {export}", file=sys.stderr)
        directory = export
    if args.num_speculative_tokens is not None and args.num_speculative_tokens < 1:
        print("error: --num-speculative-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        from mtp_recipes.export_check import check_export, describe  # torch loads here

        engines = ENGINES if args.engine == "all" else (args.engine,)
        reports = check_export(directory, engines, args.num_speculative_tokens)
    except MTPRecipesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(directory, reports))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
