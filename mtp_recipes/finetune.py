"""``python -m mtp_recipes.finetune [--config-name RECIPE] [key=value ...]``: run a fine-tuning recipe.

Configs live in ``configs/`` (shipped inside the package as ``mtp_recipes/configs``), so the command
works from any directory. Errors caused by input print one line and exit with status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtp_recipes.errors import MTPRecipesError
from mtp_recipes.recipe import FinetuneRecipe

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="finetune")
def main(cfg: DictConfig) -> None:
    logging.getLogger("mtp_recipes").setLevel(logging.INFO)
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        FinetuneRecipe(cfg, run_dir).run()
    except MTPRecipesError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
