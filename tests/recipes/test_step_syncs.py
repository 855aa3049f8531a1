"""The train step copies device values to the host a bounded number of times, whatever the micro-batch count.

Every host sync made by a line of mtp_recipes is counted, the families' own kernels included; only what
transformers' modeling code does is not ours to count.
"""

from __future__ import annotations

import inspect
from collections import Counter
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
            if OURS in path.parents:
                self.calls.append(f"{path.relative_to(OURS)}:{caller.f_lineno} {name}")
        return func(*args, **(kwargs or {}))


def syncs_per_step(tmp_path: Path, accum: int, *overrides: str, steps: int = 2) -> Counter:
    cfg = composed(
        *FAST, f"trainer.grad_accum_steps={accum}", f"trainer.max_steps={steps}", "trainer.save_final=false", *overrides
    )
    recipe = FinetuneRecipe(cfg, tmp_path / f"accum{accum}")
    recipe.setup()
    try:
        with HostSyncs() as counter:
            recipe.train()
    finally:
        recipe.cleanup()
    return Counter(counter.calls)


@pytest.mark.slow
def test_host_syncs_do_not_grow_with_micro_batches(tmp_path):
    """Nemotron-H (the default job): no family kernel syncs; one sync per optimizer step (two steps) and one for
    the validation after the last step, with 1 or 4 micro-batches."""
    one, four = syncs_per_step(tmp_path, 1), syncs_per_step(tmp_path, 4)
    assert one == four, (one, four)
    assert sum(one.values()) == 3 and not [c for c in one if c.startswith("families/")], one


@pytest.mark.slow
def test_a_family_kernel_that_syncs_per_call_is_counted(tmp_path):
    """MiniMax-M3's document-aware indexer asks, once per indexer call, whether its rows are packed (to keep
    transformers' own path, bit-exact, on unpacked rows): those syncs grow with the forwards, and only those."""
    model = "model=minimax_m3_debug"
    one, four = syncs_per_step(tmp_path, 1, model), syncs_per_step(tmp_path / "4", 4, model)
    ours = {c for c in one | four if not c.startswith("families/")}
    assert {c: one[c] for c in ours} == {c: four[c] for c in ours} and sum(one[c] for c in ours) == 3
    growing = {c for c in four if four[c] != one[c]}
    assert growing and all(c.startswith("families/minimax_m3_attention.py") and c.endswith("__bool__") for c in growing)
