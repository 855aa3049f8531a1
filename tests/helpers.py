"""Shared test helpers: debug model configs from configs/model/*_debug.yaml, a tiny Nemotron-H config, tiny
batches and the command prefix that launches N processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import NemotronHConfig

ROOT = Path(__file__).resolve().parents[1]
DEBUG_MODELS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*_debug.yaml"))


def launcher(nproc: int) -> list[str]:
    """The command prefix that runs a script or ``-m module`` in ``nproc`` processes (torchrun), or in one."""
    if nproc == 1:
        return [sys.executable]
    # --standalone: a free port of its own, so concurrent suites (or a stray worker) never share a rendezvous
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def tiny_nemotron(**overrides: Any) -> NemotronHConfig:
    """A Nemotron-H config of a few thousand parameters: Mamba2, attention and MoE layers (``overrides`` win)."""
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        layers_block_type=["linear_attention", "full_attention", "moe"],
        mamba_num_heads=4,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=2,
        chunk_size=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_shared_expert_intermediate_size=16,
    )
    return NemotronHConfig(**{**fields, **overrides})


# Debug models whose MTP layers share one fusion and final norm (Qwen3-Next, Qwen3.5): their family trains one
# physical depth, run at every step (``mtp.use_repeated_layer``), as their engines draft.
ONE_PHYSICAL_DEPTH = ("qwen3_next_debug", "qwen3_5_debug", "qwen3_5_moe_debug")


def depths(name: str, d: int) -> dict[str, Any]:
    """MTP overrides for ``d`` depths of debug model ``name``: ``d`` physical depths, or one repeated ``d`` times
    where the family trains one."""
    return {"num_layers": d, **({"use_repeated_layer": True} if d > 1 and name in ONE_PHYSICAL_DEPTH else {})}


def debug_model_config(name: str, **changes: Any) -> dict[str, Any]:
    """The HF config dict of a debug model config, with optional field changes."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml"), resolve=True)
    return {**cfg["config"], **changes}


def packed_batch(vocab: int, lengths: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of packed documents: ``lengths[b]`` lists the document lengths of row b (they fill the row)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for docs in lengths:
        ids, labels, seq_idx = [], [], []
        for d, n in enumerate(docs):
            doc = torch.randint(3, vocab, (n,), generator=g)
            ids.append(doc)
            labels.append(torch.cat([doc[1:], torch.tensor([-100])]))
            seq_idx.append(torch.full((n,), d))
        rows.append((torch.cat(ids), torch.cat(labels), torch.cat(seq_idx)))
    input_ids, labels, seq_idx = (torch.stack(x) for x in zip(*rows))
    return {"input_ids": input_ids, "labels": labels, "seq_idx": seq_idx}


def published_round_trip(path, published: dict[str, torch.Tensor], out_dir, *, lr: float = 1e-3, weight_decay=0.01):
    """The published-layout contract: load -> save is bit-exact; 2 AdamW steps -> save keeps keys/shapes/dtypes.

    Returns the loaded (then trained) model and the trained export's tensors for family-specific checks.
    """
    from safetensors.torch import load_file

    from mtp_recipes.model import MTPModel

    model = MTPModel.from_pretrained(path)
    same = load_file(model.save_pretrained(out_dir / "same") / "model.safetensors")
    assert set(same) == set(published)
    for key, tensor in published.items():
        assert same[key].dtype == tensor.dtype and torch.equal(same[key], tensor), key

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for seed in range(2):
        model(**packed_batch(model.text_config.vocab_size, [[10, 6], [16]], seed=seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = load_file(model.save_pretrained(out_dir / "trained") / "model.safetensors")
    assert set(trained) == set(published)
    for key, tensor in published.items():
        assert (trained[key].shape, trained[key].dtype) == (tensor.shape, tensor.dtype), key
    return model, trained
