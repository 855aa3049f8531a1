"""The memory plan counts the configured model without allocating it and refuses, on CUDA only, what cannot fit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtp_recipes.config import to_schema
from mtp_recipes.errors import ConfigError
from mtp_recipes.memory_plan import GIB, count_model, memory_plan, refuse_unfitting, smallest_fitting
from mtp_recipes.model import MTPModel
from mtp_recipes.plan import main
from tests.helpers import debug_model_config
from tests.recipes.test_finetune import composed

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PUBLISHED = (
    "deepseek_v3",
    "nemotron_super",
    "step3p5_flash",
    "minimax_m3",
    "glm4_5_air",
    "deepseek_v32",
    "mimo_v2_flash",
    "qwen3_next_80b",
    "qwen3_5_27b",
    "qwen3_5_35b_a3b",
)


def config(*overrides: str, name: str = "finetune"):
    return to_schema(composed("model=deepseek_v3_debug", *overrides, name=name))


def with_ep(cfg, ep: int):
    """``cfg`` with ``trainer.ep`` set, whether or not the trainer schema has that field yet."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg))
    plain.trainer.ep = ep
    return plain


def test_counts_equal_the_built_model_and_shards_divide_by_the_world():
    torch.manual_seed(0)
    real = MTPModel.from_config(debug_model_config("deepseek_v3_debug"))
    four, eight = memory_plan(config(), 4), memory_plan(config(), 8)
    assert four.parameters == four.trainable == sum(p.numel() for p in real.parameters())
    assert four.params == 4 * four.parameters / 4 and four.optimizer == 2 * four.grads
    assert four.buffers == sum(4 * b.numel() for b in real.buffers())  # fp32, on every rank
    for part in ("params", "grads", "optimizer"):
        assert getattr(eight, part) == pytest.approx(getattr(four, part) / 2)
    assert (eight.gathered, eight.activations, eight.buffers) == (four.gathered, four.activations, four.buffers)

    frozen = memory_plan(config("mtp.train_only=true"), 4)
    trained = sum(p.numel() for p in real.mtp.parameters())
    assert frozen.trainable == trained and frozen.grads == 4 * trained / 4
    # the frozen backbone is held in bf16 (what transformers keeps in fp32 stays so), the depths keep fp32
    held = MTPModel.from_config(debug_model_config("deepseek_v3_debug"), train_only=True, frozen_dtype=torch.bfloat16)
    assert frozen.params == sum(p.numel() * p.element_size() for p in held.parameters()) / 4
    assert 2 * frozen.parameters < 4 * frozen.params < 4 * four.params


def test_hsdp_shards_over_the_replica_not_the_world():
    # 8 ranks as 2 replicas of 4: each parameter is sharded over the 4 ranks of its replica
    hsdp, four = memory_plan(config("trainer.dp_replicate=2"), 8), memory_plan(config(), 4)
    assert (hsdp.world_size, hsdp.shard_group) == (8, 4)
    for part in ("params", "grads", "optimizer", "buffers", "gathered", "activations"):
        assert getattr(hsdp, part) == getattr(four, part)
    assert hsdp.params == 2 * memory_plan(config(), 8).params
    with pytest.raises(ConfigError, match="trainer.dp_replicate=3 does not divide the 8 ranks"):
        memory_plan(config("trainer.dp_replicate=3"), 8)


def test_expert_parallel_gathers_only_the_local_experts():
    torch.manual_seed(0)
    real = MTPModel.from_config(debug_model_config("deepseek_v3_debug"))  # 4 routed experts per MoE block
    # an independent reference: blocks by their key prefix, routed experts by name, everything else the root
    blocks: dict[str, list[int]] = {}
    for name, p in real.named_parameters():
        block = re.match(r"(backbone\.model\.layers\.\d+|mtp\.depths\.\d+\.blocks\.\d+)\.", name)
        if block:
            blocks.setdefault(block[1], [0, 0])[".mlp.experts." in name] += p.numel()
    root = sum(p.numel() for p in real.parameters()) - sum(map(sum, blocks.values()))
    assert sorted(e for _, e in blocks.values()) == [0, 4 * 3 * 64 * 32, 4 * 3 * 64 * 32]  # 4 x (gate, up, down)

    plain = memory_plan(config(), 4)
    for ep in (1, 2, 4):
        plan = memory_plan(with_ep(config(), ep), 4)
        largest = max(dense + experts / ep for dense, experts in blocks.values())
        assert plan.gathered == 2 * (root + 2 * largest)
        assert (plan.expert_parallel, plan.params, plan.grads, plan.optimizer) == (
            ep,
            plain.params,
            plain.grads,
            plain.optimizer,
        )  # expert weights are still sharded over all 4 ranks of the shard group (ep x expert-FSDP)
    assert memory_plan(with_ep(config(), 2), 4).gathered < plain.gathered
    with pytest.raises(ConfigError, match=r"trainer.ep=3 does not divide the 4 ranks of a replica \(4 ranks / trainer"):
        memory_plan(with_ep(config(), 3), 4)
    with pytest.raises(ConfigError, match=r"trainer.ep=4 does not divide the 2 ranks of a replica \(4 ranks / trainer"):
        memory_plan(with_ep(config("trainer.dp_replicate=2"), 4), 4)


def test_activations_follow_seq_len_and_checkpointing():
    base = memory_plan(config("data.seq_len=256"), 2)
    assert memory_plan(config("data.seq_len=512"), 2).activations == 2 * base.activations
    # 3 blocks (2 layers + 1 MTP block): each keeps 34 bytes per token and hidden unit, checkpointed only its
    # 2-byte input, plus one block recomputed in full
    checkpointed = memory_plan(config("data.seq_len=256", "trainer.activation_checkpointing=true"), 2)
    assert checkpointed.activations == base.activations * (2 * 3 + 34) / (34 * 3)


def test_eager_attention_adds_its_score_matrices():
    """Unfused attention keeps 5 bytes per head and (query, key) pair per layer (Korthikanti et al., 2022): all
    layers without checkpointing, the one recomputed layer with it."""
    cfg = ("data.seq_len=256", "data.batch_size=2")
    heads = debug_model_config("deepseek_v3_debug")["num_attention_heads"]
    scores = 5 * heads * 256**2 * 2
    for checkpointing, layers in (("false", 3), ("true", 1)):
        fused = memory_plan(config(*cfg, f"trainer.activation_checkpointing={checkpointing}"), 2)
        eager = memory_plan(
            config(*cfg, f"trainer.activation_checkpointing={checkpointing}", "model.attn_implementation=eager"), 2
        )
        assert eager.activations - fused.activations == layers * scores


def test_the_smallest_layout_of_a_dense_model_never_splits_experts():
    """A dense model has no routed experts: the search tries ep=1 only (at 2 GPUs it asked for ep=2 and failed)."""
    dense = to_schema(composed("model=qwen3_5_debug", "trainer.activation_checkpointing=true"))
    counts = count_model(dense)
    assert counts.routed_experts == 0
    one = memory_plan(dense, 1, counts)
    limit = (one.total - 0.4 * (one.params + one.grads + one.optimizer)) / GIB  # 1 GPU does not fit, 2 do
    best = smallest_fitting(OmegaConf.merge(dense, {"trainer": {"gpu_memory_gb": limit}}), counts)
    assert best is not None and (best.world_size, best.expert_parallel) == (2, 1)


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
    assert "on 2 GPUs of 80 GB (sharded over 2, expert parallel 1): fits" in out
    assert f"| **total** | {plan.total / GIB:.1f} |" in out


def sbatch_settings(recipe: str) -> tuple[int, list[str]]:
    """The GPU count and the ``trainer.*`` overrides a recipe's slurm.sbatch runs with."""
    script = (RECIPES / recipe / "slurm.sbatch").read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", script, re.M)[1])
    per_node = int(re.search(r"NPROC_PER_NODE=\$\{NPROC_PER_NODE:-(\d+)\}", script)[1])
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    return nodes * per_node, re.findall(r"\btrainer\.\w+=[^\s\\]+", code)


@pytest.mark.parametrize("recipe", PUBLISHED)
def test_each_published_recipe_fits_80gb_gpus_as_its_sbatch_runs_it(recipe):
    world, overrides = sbatch_settings(recipe)
    ep = [int(o.split("=")[1]) for o in overrides if o.startswith("trainer.ep=")]
    schema = [o for o in overrides if not o.startswith("trainer.ep=")]
    cfg = to_schema(composed(f"model.path={RECIPES / recipe}", *schema, name=recipe))
    plan = memory_plan(with_ep(cfg, ep[0]) if ep else cfg, world)
    assert cfg.trainer.gpu_memory_gb == 80 and plan.fits
    assert plan.total <= 0.9 * 80 * GIB  # ~10 % left for the CUDA context, NCCL buffers and fragmentation
    # the README shows this very plan (python -m mtp_recipes.plan prints the same table)
    assert plan.table() in (RECIPES / recipe / "README.md").read_text()


def test_stored_configs_rebuild_the_published_parameter_counts():
    """The stored config.json files are transcriptions; the published tensor counts check them."""
    with torch.device("meta"):
        nemotron = MTPModel.from_config(json.loads((RECIPES / "nemotron_super" / "config.json").read_text()))
    # NVIDIA-Nemotron-3-Super-120B-A12B-BF16 safetensors headers: 123,611,012,096 weights, 2,942,324,736 in MTP
    assert sum(p.numel() for p in nemotron.parameters()) == 123_611_012_096
    assert sum(p.numel() for p in nemotron.mtp.parameters()) == 2_942_324_736

    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl

    from mtp_recipes.model_config import config_from_dict

    raw = json.loads((RECIPES / "minimax_m3" / "config.json").read_text())
    with torch.device("meta"):
        vl = modeling_minimax_m3_vl.MiniMaxM3SparseForConditionalGeneration(config_from_dict(raw))
    # MiniMaxAI/MiniMax-M3 on the Hub: 426,993,800,960 BF16 + 46,339,200 F32 tensor elements (vision tower
    # included, no MTP tensors); transformers holds the 57 MoE layers' router biases as buffers
    routing_biases = sum(b.numel() for n, b in vl.named_buffers() if n.endswith("e_score_correction_bias"))
    assert sum(p.numel() for p in vl.parameters()) + routing_biases == 426_993_800_960 + 46_339_200

    raw = json.loads((RECIPES / "deepseek_v32" / "config.json").read_text())
    with torch.device("meta"):
        v32 = MTPModel.from_config(raw)
    # deepseek-ai/DeepSeek-V3.2: 685,355,329,792 weight elements besides the FP8 scale blocks; the frozen indexers
    # and the router biases are buffers here, and the MTP layer's embed_tokens / shared_head.head are export copies
    held = sum(b.numel() for n, b in v32.named_buffers() if "indexer" in n or n.endswith("e_score_correction_bias"))
    copies = 2 * raw["vocab_size"] * raw["hidden_size"]
    assert sum(p.numel() for p in v32.parameters()) + held + copies == 685_355_329_792
