"""Activation checkpointing changes memory, not results; it is really applied to every block."""

from __future__ import annotations

import pytest
import torch

import mtp_recipes.distributed.parallelize as parallelize
from mtp_recipes.model import MTPModel
from tests.helpers import DEBUG_MODELS, debug_model_config, depths, packed_batch


@pytest.mark.parametrize("name", DEBUG_MODELS)
def test_activation_checkpointing_gives_the_same_gradients(name, monkeypatch):
    torch.manual_seed(0)
    plain = MTPModel.from_config(debug_model_config(name), **depths(name, 2))
    checkpointed = MTPModel.from_config(debug_model_config(name), **depths(name, 2))
    checkpointed.load_state_dict(plain.state_dict())

    calls = {"n": 0}
    real = parallelize.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(parallelize, "checkpoint", counting)
    parallelize.apply_activation_checkpointing(checkpointed)
    batch = packed_batch(plain.text_config.vocab_size, [[10, 14], [24]])
    for model in (plain, checkpointed):
        model.train()
        model(**batch).loss.backward()
    blocks = len(plain.family.backbone_blocks(plain.backbone)) + sum(len(d.blocks) for d in plain.mtp.depths)
    assert calls["n"] >= blocks  # every backbone block and every MTP block ran under checkpoint
    for (n, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, n
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize(
    ("backend", "device"), [("aot_eager", "cpu"), pytest.param("inductor", "cuda", marks=pytest.mark.gpu)]
)
def test_compiled_blocks_match_eager(backend, device):
    """``trainer.compile``: each block torch.compile'd in place — same keys, loss, grads.

    Nemotron-H, because its patched Mamba2 mixers are the part most likely to break tracing. On CPU the blocks are
    traced (dynamo) and their autograd graphs built (AOTAutograd), the part every backend shares, and run without
    codegen: inductor's C++ code for a CPU is not what anyone trains with, and generating it took 45 s of the
    suite's 15 minutes (cold cache, 2 cores). Inductor itself is checked on a GPU, where its Triton code runs.
    """
    torch.manual_seed(0)
    eager = MTPModel.from_config(debug_model_config("nemotron_h_debug")).to(device)
    compiled = MTPModel.from_config(debug_model_config("nemotron_h_debug")).to(device)
    compiled.load_state_dict(eager.state_dict())
    parallelize.apply_compile(compiled, backend)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = {k: v.to(device) for k, v in packed_batch(eager.text_config.vocab_size, [[20, 12], [32]]).items()}
    a, b = eager(**batch).loss, compiled(**batch).loss
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
