"""The train step copies device values to the host a bounded number of times, whatever the micro-batch count."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from torch.overrides import TorchFunctionMode

import mtp_recipes
from mtp_recipes.recipe import FinetuneRecipe
from tests.recipes.test_finetune import FAST, composed

# Tensor methods that wait for the device and copy to the host.
SYNCS = {"item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__"}
OURS = Path(mtp_recipes.__file__).parent


class HostSyncs(TorchFunctionMode):
    """Counts the host syncs made by mtp_recipes' own lines (the model's internals are transformers')."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            caller = inspect.currentframe().f_back
            path = Path(caller.f_code.co_filename)
            if OURS in path.parents and "families" not in path.parts:
                self.calls.append(f"{path.name}:{caller.f_lineno} {name}")
        return func(*args, **(kwargs or {}))


def syncs_per_step(tmp_path: Path, accum: int, steps: int = 2) -> list[str]:
    cfg = composed(*FAST, f"trainer.grad_accum_steps={accum}", f"trainer.max_steps={steps}", "trainer.save_final=false")
    recipe = FinetuneRecipe(cfg, tmp_path / f"accum{accum}")
    recipe.setup()
    try:
        with HostSyncs() as counter:
            recipe.train()
    finally:
        recipe.cleanup()
    return counter.calls


@pytest.mark.slow
def test_host_syncs_do_not_grow_with_micro_batches(tmp_path):
    one, four = syncs_per_step(tmp_path, 1), syncs_per_step(tmp_path, 4)
    assert sorted(one) == sorted(four), (one, four)
    # one per optimizer step (two steps) and one for the validation after the last step
    assert len(one) == 3, one
