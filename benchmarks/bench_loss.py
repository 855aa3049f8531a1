"""CPU micro benchmark: chunked linear cross-entropy vs materialised logits (time and peak RSS).

Each measurement runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) belongs
to that variant alone. Example::

    python benchmarks/bench_loss.py --tokens 4096 --hidden 512 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mtp_recipes.loss.linear_ce import linear_cross_entropy


def _measure(impl: str, tokens: int, hidden: int, vocab: int, chunk: int | None, reps: int) -> dict:
    """Forward + backward of one variant; returns mean seconds and peak RSS in MiB."""
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (tokens,))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        if impl == "chunked":
            loss = linear_cross_entropy(h, w, t, reduction="mean", chunk_size=chunk)
        else:
            loss = F.cross_entropy(h @ w.T, t)
        loss.backward()
        times.append(time.perf_counter() - start)
        h.grad = w.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "impl": impl,
        "seconds": sum(times) / len(times),
        "peak_rss_mib": peak / 1024,
        "rss_growth_mib": (peak - base_rss) / 1024,
        "loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=None, help="default: the library's choice")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--impl", choices=["chunked", "materialised"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.tokens, args.hidden, args.vocab, args.chunk, args.reps)
    if args.impl:
        print(json.dumps(_measure(args.impl, *shape)))
        return
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} "
          f"fp32 logits={args.tokens * args.vocab * 4 / 2**20:.0f} MiB")
    for impl in ("materialised", "chunked"):
        cmd = [sys.executable, __file__, "--impl", impl] + [
            f"--{name}={value}" for name, value in vars(args).items()
            if name != "impl" and value is not None
        ]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"{impl:>12}: {result['seconds'] * 1e3:8.1f} ms/iter  "
              f"peak RSS growth {result['rss_growth_mib']:7.0f} MiB  loss {result['loss']:.6f}")


if __name__ == "__main__":
    main()
