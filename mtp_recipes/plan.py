"""``python -m mtp_recipes.plan [--config-name RECIPE] [--world-size N] [key=value ...]``: memory per GPU.

Answers "how many GPUs does this run need?": without ``--world-size``, the smallest layout that fits
``trainer.gpu_memory_gb`` (GPUs, ``trainer.ep``, activation checkpointing; see
:func:`mtp_recipes.memory_plan.smallest_fitting`); with it, the plan of that layout, and when it does not fit
the smallest one that does, with exit status 1. The table is :mod:`mtp_recipes.memory_plan`'s: what each GPU
holds under FSDP2 (sharded weights, gradients and AdamW moments, buffers, the largest all-gather, activations).
Input errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from mtp_recipes.command_line import check_command_line, recipe_names
from mtp_recipes.config import CONFIG_DIR
from mtp_recipes.errors import MTPRecipesError

if TYPE_CHECKING:
    from mtp_recipes.memory_plan import MemoryPlan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_recipes.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-name", "-cn", default="finetune", metavar="RECIPE",
                        help=f"the recipe ({', '.join(recipe_names())}; finetune: the debug job); plan a published "
                        "one offline with model.path=recipes/RECIPE")  # fmt: skip
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="GPUs in all; default: the smallest number that fits")  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for finetune")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.world_size is not None and args.world_size < 1:
        print("error: --world-size must be >= 1", file=sys.stderr)
        return 2
    check_command_line(["--config-name", args.config_name, *args.overrides], "plan", "finetune")
    try:
        from hydra import compose, initialize_config_dir

        from mtp_recipes.config import to_schema
        from mtp_recipes.input_checks import check_inputs

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = to_schema(compose(config_name=args.config_name, overrides=args.overrides))
        check_inputs(cfg, data=False)
        from mtp_recipes.memory_plan import GIB, count_model, memory_plan, smallest_fitting  # torch loads here

        counts = count_model(cfg)
        requested = memory_plan(cfg, args.world_size, counts) if args.world_size else None
        best = None if requested is not None and requested.fits else smallest_fitting(cfg, counts)
    except MTPRecipesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = cfg.trainer
    print(
        f"assumes data.seq_len={cfg.data.seq_len}, data.batch_size={cfg.data.batch_size} rows per GPU and step, "
        f"{'fp32' if t.precision == 'fp32' else 'bf16'} compute, AdamW, trainer.dp_replicate={t.dp_replicate}, "
        f"trainer.gpu_memory_gb={t.gpu_memory_gb:g} per GPU\n"
    )
    if requested is not None:
        print(_layout(requested) + "\n\n" + requested.table())
        if requested.fits:
            return 0
    if best is None:
        print(f"nothing up to 1024 GPUs fits {t.gpu_memory_gb:g} GB: lower data.seq_len or data.batch_size")
        return 1
    print(f"{'' if requested is None else chr(10)}smallest that fits: {_layout(best)}\n\n{best.table()}")
    if requested is not None:
        print(f"error: {requested.total / GIB:.0f} GiB per GPU do not fit on {requested.world_size} GPUs of "
              f"{t.gpu_memory_gb:g} GB; the smallest layout that fits is above", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _layout(plan: MemoryPlan) -> str:
    """The layout as the command-line settings that give it."""
    ac = "true" if plan.activation_checkpointing else "false"
    return f"--world-size {plan.world_size} trainer.ep={plan.expert_parallel} trainer.activation_checkpointing={ac}"


if __name__ == "__main__":
    sys.exit(main())
