"""Shared test helpers: debug model configs from configs/model/*_debug.yaml and tiny batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DEBUG_MODELS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*_debug.yaml"))


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
