"""LM-head + cross-entropy for the main head and D MTP depths: ours vs materialised logits vs the GEMM floor.

Per configuration (D = 0, 1, 3 depths sharing one head ``W [V, H]``, ``T`` tokens each), one fwd+bwd of:

* ``ours``: :func:`mtp_recipes.loss.linear_ce.segmented_linear_cross_entropy` with main + D depths in one call
  (``--impl``, default ``auto``: the compiled one-pass loss on CUDA, the recompute path on CPU);
* ``materialised``: ``Σ F.cross_entropy((h_k @ W.T).float(), y_k)`` (the NeMo AutoModel default);
* ``floor``: the three GEMMs of T×H×V per head (logits, grad_h, grad_W), timed at the real shapes.

Reports median time, the ratio to the floor (measured in the same run) and, on CUDA, the peak memory above the
inputs (``torch.cuda.max_memory_allocated``, gradients included). Data: random (never zeros).

    python benchmarks/bench_loss.py                  # CUDA, bf16, T=8192 H=4096 V=131072 (an 8B-class head)
    python benchmarks/bench_loss.py --small          # CPU smoke run, fp32, small shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mtp_recipes.loss.linear_ce import resolve_impl, segmented_linear_cross_entropy


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall milliseconds of ``fn()`` after ``warmup`` calls (CUDA-synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_gb_above(fn: Callable[[], object], device: torch.device) -> float | None:
    """GB allocated at the peak of ``fn()`` above what was allocated before it; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 1e9


def make_inputs(args: argparse.Namespace, depths: int, device: torch.device, dtype: torch.dtype):
    """Head ``W``, ``1 + depths`` hidden states and targets; head k has no target for its last k + 1 tokens."""
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
    hiddens, targets = [], []
    for k in range(depths + 1):
        hiddens.append(torch.randn(args.tokens, args.hidden, device=device, generator=gen).to(dtype).requires_grad_())
        y = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
        y[args.tokens - 1 - k :] = -100
        targets.append(y)
    return weight, hiddens, targets


def bench_depths(args: argparse.Namespace, depths: int, device: torch.device, dtype: torch.dtype, impl: str) -> dict:
    """Floor, materialised and ours for main + ``depths`` heads; prints one line each."""
    weight, hiddens, targets = make_inputs(args, depths, device, dtype)
    scales = torch.tensor([1.0] + [0.1 / max(depths, 1)] * depths, device=device)
    grad_logits = torch.randn(args.tokens, args.vocab, device=device).to(dtype)

    def ours() -> None:
        segmented_linear_cross_entropy(hiddens, weight, targets, scales, impl=impl).loss.backward()

    def materialised() -> None:
        losses = [F.cross_entropy((h @ weight.T).float(), y) for h, y in zip(hiddens, targets, strict=True)]
        sum(c * loss for c, loss in zip(scales.tolist(), losses, strict=True)).backward()

    def floor() -> None:
        with torch.no_grad():
            for h in hiddens:
                h @ weight.T, grad_logits @ weight, grad_logits.T @ h

    results = {}
    for name, fn in (("floor", floor), ("materialised", materialised), ("ours", ours)):
        try:
            ms = time_ms(fn, device, args.warmup, args.iters)
            peak = peak_gb_above(fn, device) if name != "floor" else None
        except torch.OutOfMemoryError:
            ms, peak = None, None
        results[name] = {"ms": ms, "peak_gb_above_inputs": peak}
        weight.grad = None
        for h in hiddens:
            h.grad = None
    for name, res in results.items():
        res["x_floor"] = None if res["ms"] is None else res["ms"] / results["floor"]["ms"]
        peak = "-" if res["peak_gb_above_inputs"] is None else f"{res['peak_gb_above_inputs']:.2f} GB"
        ms = "OOM" if res["ms"] is None else f"{res['ms']:9.2f} ms"
        ratio = "" if res["ms"] is None else f"{res['x_floor']:.2f}x floor"
        print(f"D={depths}  {name:>12}: {ms}  {ratio:>12}  peak +{peak}", flush=True)
    return {"depths": depths, **results}


def bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    impl = resolve_impl(args.impl, device)
    rows = []
    for depths in args.depths:
        rows.append(bench_depths(args, depths, device, dtype, impl))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"impl": impl, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU smoke run: T=1024 H=256 V=8192, fp32")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", default="auto", choices=["auto", "torch", "fused", "compiled"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench_results/loss.json"))
    args = parser.parse_args()
    if args.small:
        args.tokens, args.hidden, args.vocab, args.dtype, args.device = 1024, 256, 8192, "float32", "cpu"
        args.warmup, args.iters = 1, 3
    print(f"T={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} on {args.device}, impl={args.impl}")
    write_report(args, bench(args))


def write_report(args: argparse.Namespace, results: dict) -> None:
    """Arguments, torch version, device and results of one benchmark run as JSON in ``args.out``."""
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, **results}
    if args.device == "cuda":
        report["device_name"] = torch.cuda.get_device_name()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
