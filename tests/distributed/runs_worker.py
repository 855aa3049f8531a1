"""Several fine-tuning runs one after another in one launch of N processes (torchrun starts the interpreters once):
``python -m torch.distributed.run --nproc_per_node N tests/distributed/runs_worker.py JOBS.json``.

``JOBS.json`` is a list of ``{"run_dir": ..., "overrides": [...]}``; each job is composed as the command line
composes it and run by :class:`~mtp_recipes.recipe.FinetuneRecipe` in the process group made here once (a run
leaves a group it did not create as it found it).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from mtp_recipes.recipe import FinetuneRecipe
from tests.recipes.test_finetune import composed

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # the runs' log lines reach the launch's output, as on the command line
    torch.distributed.init_process_group("gloo")
    for job in json.loads(Path(sys.argv[1]).read_text()):
        FinetuneRecipe(composed(*job["overrides"]), job["run_dir"]).run()
    torch.distributed.destroy_process_group()
