"""Run under torchrun (2 ranks): expert-parallel dispatch/combine against the experts module run whole.

Arguments: ``<debug model>:<experts implementation>:<dtype>`` (float64 needs ``eager``: transformers'
``grouped_mm`` takes 16/32-bit floats only). For each, every rank builds the same model in that dtype and
takes one MoE layer's experts module.
Reference: that module as the family runs it, on both ranks' tokens at once, with gradients for the tokens,
the routing weights and the experts. Then the module is split over an ``ep`` group of 2 and each rank runs
only its own tokens through it. Checked on every rank: its output and token/weight gradients equal the
reference's rows, and its experts' gradients (every token routed to them, from both ranks) equal the
reference's rows of the merged tensors. Two routings: random top-k, and one that sends every token to rank
0's experts (rank 1 receives nothing, yet its experts get zero gradients and every collective matches).
Prints one ``ok <argument> <routing>`` line per check on rank 0.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mtp_recipes.distributed.expert_parallel import shard_experts
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config

TOKENS = 12  # per rank


def routings(num_experts: int, top_k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Top-k expert ids [ranks, TOKENS, top_k], distinct per token, for both ranks."""
    uniform = torch.rand(2, TOKENS, num_experts, generator=g).argsort(-1)[..., :top_k]
    to_rank0 = torch.rand(2, TOKENS, num_experts // 2, generator=g).argsort(-1)[..., :top_k]
    return {"random": uniform, "all to rank 0": to_rank0}


def check(spec: str, rank: int, mesh) -> None:
    name, implementation, dtype = spec.split(":")
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config(name), dtype=dtype, experts_implementation=implementation)
    experts = [m for block in model.blocks() for m in model.family.expert_modules(block)]
    assert experts, name
    module = experts[0]
    weights = dict(module.named_parameters(recurse=False))
    num_experts, hidden = next(iter(weights.values())).shape[0], model.text_config.hidden_size
    top_k = model.family.routed_top_k(model.text_config)
    g = torch.Generator().manual_seed(1)
    cases = {}
    for routing, index in routings(num_experts, top_k, g).items():
        x = torch.randn(2, TOKENS, hidden, dtype=dtype, generator=g, requires_grad=True)
        w = torch.rand(2, TOKENS, top_k, dtype=dtype, generator=g, requires_grad=True)
        cotangent = torch.randn(2, TOKENS, hidden, dtype=dtype, generator=g)
        out = module(x.view(-1, hidden), index.view(-1, top_k), w.view(-1, top_k))
        grads = torch.autograd.grad((out * cotangent.view(-1, hidden)).sum(), [x, w, *weights.values()])
        cases[routing] = (index, x.detach(), w.detach(), cotangent, out.view(2, TOKENS, hidden).detach(), grads)

    shard_experts(experts, mesh)
    local = num_experts // 2
    rows = slice(rank * local, (rank + 1) * local)
    for routing, (index, x, w, cotangent, ref_out, ref_grads) in cases.items():
        mine_x, mine_w = x[rank].clone().requires_grad_(), w[rank].clone().requires_grad_()
        params = list(module.parameters(recurse=False))
        out = module(mine_x, index[rank], mine_w)
        grads = torch.autograd.grad((out * cotangent[rank]).sum(), [mine_x, mine_w, *params])
        torch.testing.assert_close(out, ref_out[rank], msg=f"{spec} {routing}: output")
        torch.testing.assert_close(grads[0], ref_grads[0][rank], msg=f"{spec} {routing}: token gradients")
        torch.testing.assert_close(grads[1], ref_grads[1][rank], msg=f"{spec} {routing}: routing-weight gradients")
        for param, grad, ref in zip(params, grads[2:], ref_grads[2:], strict=True):
            assert param.to_local().shape[0] == local and grad.to_local().shape[0] == local
            torch.testing.assert_close(grad.to_local(), ref[rows], msg=f"{spec} {routing}: expert gradients")
        if routing == "all to rank 0" and rank == 1:
            assert all(not grad.to_local().any() for grad in grads[2:])  # nothing routed here: zeros, not None
        if rank == 0:
            print(f"ok {spec} {routing}", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    for spec in sys.argv[1:]:
        check(spec, rank, mesh)
    # Both ranks done before either tears gloo down, as the library's shutdown does. Without the barrier one run in
    # six aborted a rank ("terminate called without an active exception", SIGABRT); the teardown is the suspect.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
