"""One optimizer step of a 1.2B Nemotron-H: our MTPModel (packed rows, seq_idx) vs plain transformers.

Model: 24 layers ``M-M-M*-ME`` ×2 + ``M-M-M-`` (11 Mamba2,
2 attention, 9 MLP, 2 MoE with 8 experts top-2), hidden 2048, V=131072, 64 Mamba heads × 64, 8 groups, state 128.
Per batch size (B=1, 2 at S=4096, bf16 params, fused AdamW, no fp32 master copy, as the anchor):

* ``ours D=0`` / ``ours D=1``: :class:`mtp_recipes.model.MTPModel` on packed rows (``seq_idx``, several documents per
  row), boundary-aware Mamba2 (on CUDA mamba_ssm's Triton scan when it imports, else ours), one-pass chunked
  loss; D=1 adds one MTP depth (attention + MoE, the Nemotron-3 pattern ``*E``).
* ``hf``: ``NemotronHForCausalLM(input_ids, labels=input_ids)``, unpacked, transformers' own kernels/fallbacks.

Reports tokens/s, MFU (:mod:`mtp_recipes.metrics`, attention-score FLOPs included), peak memory, the speed-up
``tokens/s(ours D=1) / tokens/s(hf)`` (the issue's target: >= 20x at B=1), and the MTP overhead
``step(D=1) / step(D=0)`` next to the FLOP-predicted ratio ``flops(D=1) / flops(D=0)``.

    python benchmarks/bench_step.py            # CUDA (the anchor: plain HF took 2.06 s/step at B=1, OOM at B=2)
    python benchmarks/bench_step.py --small    # CPU smoke run: tiny config, S=256, a few steps
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch
from bench_loss import peak_gb_above, time_ms, write_report
from transformers import NemotronHConfig, NemotronHForCausalLM

from mtp_recipes.families.nemotron_h_mamba.kernels import scan_backend
from mtp_recipes.metrics import flops_per_token, mfu, peak_flops
from mtp_recipes.model import MTPModel

PATTERN = "M-M-M*-ME" * 2 + "M-M-M-"


def hf_config(small: bool, seq_len: int) -> dict[str, Any]:
    """The anchor's Nemotron-H config (or a tiny one with the same layer pattern) as a config dict."""
    hidden = 64 if small else 2048
    attention = (
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        if small
        else dict(num_attention_heads=16, num_key_value_heads=4, head_dim=128)
    )
    return dict(
        model_type="nemotron_h",
        vocab_size=4096 if small else 131072,
        hidden_size=hidden,
        layers_block_type=NemotronHConfig._pattern_to_list(PATTERN),
        intermediate_size=hidden * 5 // 2,
        mamba_num_heads=hidden // 32,
        mamba_head_dim=64 if not small else 16,
        n_groups=1 if small else 8,
        ssm_state_size=16 if small else 128,
        chunk_size=32 if small else 128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=hidden,
        moe_shared_expert_intermediate_size=hidden,
        max_position_embeddings=seq_len,
        use_cache=False,
        num_nextn_predict_layers=1,
        mtp_hybrid_override_pattern="*E",
        **attention,
    )


def packed_batch(batch: int, seq_len: int, vocab: int, docs: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows of ``docs`` documents of random lengths; labels shifted within each document (last token ignored)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen)
    cuts = torch.sort(torch.randperm(seq_len - 1, generator=gen)[: docs - 1] + 1).values
    starts = torch.zeros(seq_len, dtype=torch.long)
    starts[cuts] = 1
    seq_idx = starts.cumsum(0).expand(batch, -1).contiguous()
    labels = torch.full_like(ids, -100)
    same_doc = seq_idx[:, 1:] == seq_idx[:, :-1]
    labels[:, :-1] = torch.where(same_doc, ids[:, 1:], -100)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "seq_idx": seq_idx.to(device)}


def measure(
    model: torch.nn.Module, step_inputs: dict[str, torch.Tensor], tokens: int, flops: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Time full optimizer steps; tokens/s, MFU and peak memory (absolute, CUDA only)."""
    device = torch.device(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step() -> None:
        model(**step_inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        ms = time_ms(step, device, args.warmup, args.iters)
        peak_gb_above(step, device)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        return {"ms": None, "oom": True}
    finally:
        opt.zero_grad(set_to_none=True)
        gc.collect()
    tok_s = tokens / (ms / 1e3)
    return {"ms": ms, "tokens_per_s": tok_s, "mfu": mfu(tok_s, flops, peak_flops(device)), "peak_gb": peak}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = hf_config(args.small, args.seq)
    results: dict[str, Any] = {"rows": []}
    flops_by_depth = {}
    for name in ("ours D=0", "ours D=1", "hf"):
        torch.manual_seed(0)
        with torch.device(device):
            if name == "hf":
                cfg = NemotronHConfig(**{k: v for k, v in config.items() if k != "model_type"})
                model = NemotronHForCausalLM(cfg).to(dtype)
            else:
                model = MTPModel.from_config(config, dtype=dtype, num_layers=int(name[-1])).to(device)
        flops = flops_per_token(model, seq_len=args.seq)
        if name != "hf":
            flops_by_depth[name] = flops
        model.train()
        for batch in args.batch:
            inputs = packed_batch(batch, args.seq, config["vocab_size"], args.docs, device)
            if name == "hf":
                inputs = {"input_ids": inputs["input_ids"], "labels": inputs["input_ids"]}
            res = measure(model, inputs, batch * args.seq, flops, args)
            row = {"model": name, "batch": batch, "seq": args.seq, "flops_per_token": flops, **res}
            results["rows"].append(row)
            if res["ms"] is None:
                print(f"{name:>9} B={batch}: OOM", flush=True)
                continue
            util = "-" if res["mfu"] is None else f"{res['mfu']:.1%}"
            peak = "-" if res["peak_gb"] is None else f"{res['peak_gb']:.1f} GB"
            print(
                f"{name:>9} B={batch}: {res['ms']:9.1f} ms/step  {res['tokens_per_s']:10,.0f} tok/s  "
                f"MFU {util}  peak {peak}",
                flush=True,
            )
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    predicted = flops_by_depth["ours D=1"] / flops_by_depth["ours D=0"]
    results["mtp_overhead"] = []
    for batch in args.batch:
        ms = {r["model"]: r["ms"] for r in results["rows"] if r["batch"] == batch}
        measured = None if None in (ms["ours D=0"], ms["ours D=1"]) else ms["ours D=1"] / ms["ours D=0"]
        results["mtp_overhead"].append({"batch": batch, "measured": measured, "flop_predicted": predicted})
        shown = "-" if measured is None else f"{measured:.3f}"
        print(f"MTP overhead B={batch}: step(D=1)/step(D=0) = {shown}, FLOP-predicted {predicted:.3f}")
    results["speedup_over_hf"] = []
    for batch in args.batch:
        ms = {r["model"]: r["ms"] for r in results["rows"] if r["batch"] == batch}
        speedup = None if None in (ms["hf"], ms["ours D=1"]) else ms["hf"] / ms["ours D=1"]
        results["speedup_over_hf"].append({"batch": batch, "ours_d1_over_hf": speedup})
        shown = "- (hf OOM)" if ms["hf"] is None else ("-" if speedup is None else f"{speedup:.1f}x")
        print(f"speed-up B={batch}: tokens/s ours D=1 / plain HF = {shown}")
    results["scan_backend"] = scan_backend(torch.empty(0, device=device))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--small", action="store_true", help="CPU smoke run: tiny config, S=256, B=1 and 2, 5 timed steps"
    )
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--docs", type=int, default=8, help="documents per packed row")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench_results/step.json"))
    args = parser.parse_args()
    if args.small:
        args.seq, args.dtype, args.device, args.warmup, args.iters = 256, "float32", "cpu", 2, 5
    print(f"Nemotron-H {'tiny' if args.small else '1.2B'} S={args.seq} B={args.batch} {args.dtype} on {args.device}")
    write_report(args, run(args))


if __name__ == "__main__":
    main()
