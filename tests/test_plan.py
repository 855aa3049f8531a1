"""The memory plan counts the configured model without allocating it and refuses, on CUDA only, what cannot fit."""

from __future__ import annotations

import pytest
import torch

from mtp_recipes.config import to_schema
from mtp_recipes.errors import ConfigError
from mtp_recipes.model import MTPModel
from mtp_recipes.plan import GIB, main, memory_plan, refuse_unfitting
from tests.helpers import debug_model_config
from tests.recipes.test_finetune import composed


def config(*overrides: str):
    return to_schema(composed("model=deepseek_v3_debug", *overrides))


def test_counts_equal_the_built_model_and_shards_divide_by_the_world():
    torch.manual_seed(0)
    real = MTPModel.from_config(debug_model_config("deepseek_v3_debug"))
    four, eight = memory_plan(config(), 4), memory_plan(config(), 8)
    assert four.parameters == four.trainable == sum(p.numel() for p in real.parameters())
    assert four.params == 4 * four.parameters / 4 and four.optimizer == 2 * four.grads
    for part in ("params", "grads", "optimizer"):
        assert getattr(eight, part) == pytest.approx(getattr(four, part) / 2)
    assert (eight.gathered, eight.activations) == (four.gathered, four.activations)  # not sharded

    frozen = memory_plan(config("mtp.train_only=true"), 4)
    trained = sum(p.numel() for p in real.mtp.parameters())
    assert frozen.trainable == trained and frozen.grads == 4 * trained / 4


def test_activations_follow_seq_len_and_checkpointing():
    base = memory_plan(config("data.seq_len=256"), 2)
    assert memory_plan(config("data.seq_len=512"), 2).activations == 2 * base.activations
    # 3 blocks (2 layers + 1 MTP block): each keeps 34 bytes per token and hidden unit, checkpointed only its
    # 2-byte input, plus one block recomputed in full
    checkpointed = memory_plan(config("data.seq_len=256", "trainer.activation_checkpointing=true"), 2)
    assert checkpointed.activations == base.activations * (2 * 3 + 34) / (34 * 3)


def test_setup_refuses_an_unfitting_plan_on_cuda_only(capsys):
    cfg = config("trainer.gpu_memory_gb=0.001")
    assert not memory_plan(cfg, 2).fits
    refuse_unfitting(cfg, 2, torch.device("cpu"))  # CPU runs are never refused
    with pytest.raises(ConfigError, match="per GPU on 2 GPUs but trainer.gpu_memory_gb=0.001") as err:
        refuse_unfitting(cfg, 2, torch.device("cuda", 0))
    assert "\n" not in str(err.value)
    refuse_unfitting(config(), 2, torch.device("cuda", 0))  # 80 GB holds the debug model

    assert main(["--config-name", "finetune", "--world-size", "2", "model=deepseek_v3_debug"]) == 0
    out = capsys.readouterr().out
    plan = memory_plan(config(), 2)
    assert "on 2 GPUs of 80 GB: fits" in out and f"| **total** | {plan.total / GIB:.1f} |" in out


def test_replicas_hold_a_whole_sharded_copy_and_ep_gathers_a_ranks_own_experts():
    """HSDP shards over one replica's ranks; with trainer.ep a block all-gathers only 1/ep of its experts."""
    four = memory_plan(config(), 4)
    hsdp = memory_plan(config("trainer.dp_replicate=2"), 4)
    assert hsdp.params == pytest.approx(2 * four.params) and hsdp.optimizer == pytest.approx(2 * four.optimizer)
    torch.manual_seed(0)
    real = MTPModel.from_config(debug_model_config("deepseek_v3_debug"))
    blocks = [*real.backbone.model.layers, *real.mtp.depths[0].blocks]  # dense, MoE, MoE (the MTP block)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    experts = [sum(p.numel() for p in b.mlp.experts.parameters()) if hasattr(b.mlp, "experts") else 0 for b in blocks]
    assert experts[0] == 0 and experts[1] == experts[2] > 0
    root = sum(p.numel() for p in real.parameters()) - sum(sizes)
    ep = memory_plan(config("trainer.ep=2"), 4)
    assert (ep.params, ep.grads, ep.optimizer) == (four.params, four.grads, four.optimizer)  # experts: over ep x efsdp
    assert four.gathered == 2 * (root + 2 * max(sizes))  # bf16: 2 bytes
    assert ep.gathered == pytest.approx(2 * (root + 2 * max(s - e / 2 for s, e in zip(sizes, experts))))
    assert ep.gathered < four.gathered
    assert "(dp_replicate=1, ep=2)" in ep.table()
    with pytest.raises(ConfigError, match="trainer.ep=3 must divide"):
        memory_plan(config("trainer.ep=3"), 4)
