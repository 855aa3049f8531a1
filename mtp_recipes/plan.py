"""``python -m mtp_recipes.plan --config-name RECIPE [--world-size N] [key=value ...]``: memory per GPU.

Prints the plan of :mod:`mtp_recipes.memory_plan` for the recipe's model over ``N`` ranks: what each GPU holds
under FSDP2 (sharded weights, gradients and AdamW moments, buffers, the largest all-gather, activations).
"""

from __future__ import annotations

import os
import sys

from mtp_recipes.config import CONFIG_DIR
from mtp_recipes.errors import MTPRecipesError
from mtp_recipes.memory_plan import memory_plan


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir

    from mtp_recipes.config import to_schema

    args = list(sys.argv[1:] if argv is None else argv)
    name, world_size, overrides = "finetune", int(os.environ.get("WORLD_SIZE", "8")), []
    while args:
        arg = args.pop(0)
        if arg in ("--config-name", "-cn", "--world-size"):
            value = args.pop(0) if args else ""
            name, world_size = (value, world_size) if arg != "--world-size" else (name, int(value))
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("--world-size="):
            world_size = int(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = to_schema(compose(config_name=name, overrides=overrides))
        print(memory_plan(cfg, world_size).table())
    except MTPRecipesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
