"""``python -m mtp_recipes.evaluate [--config-name RECIPE] [model.path=CHECKPOINT] [key=value ...]``.

Acceptance of MTP speculative decoding with a checkpoint on held-out prompts (see
:mod:`mtp_recipes.measure_acceptance`), written to ``eval.json`` (``eval.output``, default the Hydra run directory) and
summarised in one line. Same config groups and recipes as ``finetune``; ``model.path=null`` evaluates the model
``model.config`` builds with ``trainer.seed``, i.e. a run's initial model. Input errors print one line and exit
with status 2 (checked before torch loads); a failed ``eval.verify`` exits with status 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtp_recipes.command_line import check_command_line, discard_unused_run_dir
from mtp_recipes.config import CONFIG_DIR, to_schema
from mtp_recipes.errors import MTPRecipesError
from mtp_recipes.input_checks import check_inputs
from mtp_recipes.log_noise import quiet


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="finetune")
def main(cfg: DictConfig) -> None:
    logging.getLogger("mtp_recipes").setLevel(logging.INFO)
    try:
        schema = to_schema(cfg)
        check_inputs(schema)
        from mtp_recipes.hf_compat import KERNEL_FALLBACK_LOGGER  # torch loads here
        from mtp_recipes.measure_acceptance import VerificationError, evaluate, resolve_device, summary_line

        output = schema.eval.output or Path(HydraConfig.get().runtime.output_dir) / "eval.json"
        try:
            with quiet(KERNEL_FALLBACK_LOGGER, when=resolve_device(schema.trainer.device).type == "cpu"):
                record = evaluate(schema, output)
        except VerificationError as e:
            print(f"error: verify: {e}", file=sys.stderr)
            sys.exit(1)
    except MTPRecipesError as e:
        discard_unused_run_dir(Path(HydraConfig.get().runtime.output_dir), "evaluate")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{summary_line(record)} -> {output}")


if __name__ == "__main__":
    check_command_line(sys.argv[1:], "evaluate", "finetune")
    main()
