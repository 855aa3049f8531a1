"""Forward+backward time of the Mamba2 mixer's conv + chunked scan: ours vs transformers' fallback.

Both run on the same unpacked input (no ``seq_idx``, the only thing transformers' torch path supports), so the
ratio is the price of the boundary-aware implementation; ours is also timed on a packed row for reference.
On CUDA our Triton kernels (``triton_ssd.py``) and, when it imports, mamba_ssm's Triton scan
are timed too, unpacked and packed (the anchor's 1.2B mixer: ``--seq 4096 --heads 64 --head-dim 64 --state 128
--groups 8 --dtype bfloat16``).
Memory: on CUDA the peak allocated bytes; on CPU the bytes autograd saves for backward (deduplicated by storage),
which is what dominates training memory and is measurable without a CUDA allocator.

    python benchmarks/bench_mamba.py [--seq 2048 --heads 16 --head-dim 32 --state 64 --chunk 128] [--device cuda]
    python benchmarks/bench_mamba.py --small   # smoke run: S=256, 4 heads x 16, state 16, chunk 64, 2 timed runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from mtp_recipes.families.nemotron_h_mamba.conv import causal_conv1d_varlen
from mtp_recipes.families.nemotron_h_mamba.kernels import mamba_ssm_chunk_scan, our_triton_scan
from mtp_recipes.families.nemotron_h_mamba.ssd import ssd_chunk_scan

ConvFn = Callable[..., torch.Tensor]
ScanFn = Callable[..., torch.Tensor]


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Leaf tensors shaped like the mixer's: conv input ``[B, C, S]`` in the mixer's channel-last layout."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    conv_dim = args.heads * args.head_dim + 2 * args.groups * args.state

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(args.device, dtype).requires_grad_()

    return {
        "xBC": leaf(args.batch, args.seq, conv_dim),
        "conv_w": leaf(conv_dim, args.conv_kernel, scale=0.5),
        "conv_b": leaf(conv_dim, scale=0.1),
        "dt": leaf(args.batch, args.seq, args.heads),
        "A_log": leaf(args.heads, scale=0.5),
        "D": leaf(args.heads),
        "dt_bias": leaf(args.heads, scale=0.1),
    }


def our_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str, **kw: torch.Tensor
) -> torch.Tensor:
    """Our boundary-aware conv with transformers' fallback's calling convention."""
    return causal_conv1d_varlen(x, weight, bias, kw.get("seq_idx"), activation)


def mixer_scan_path(
    conv: ConvFn, scan: ScanFn, t: dict[str, torch.Tensor], args: argparse.Namespace, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """The mixer's unfused path between ``in_proj`` and the gated norm: conv + SiLU, split, chunked scan."""
    d_inner, d_bc = args.heads * args.head_dim, args.groups * args.state
    extra = {} if seq_idx is None else {"seq_idx": seq_idx}
    xBC = conv(t["xBC"].transpose(1, 2), t["conv_w"], t["conv_b"], activation="silu", **extra).transpose(1, 2)
    x, B, C = torch.split(xBC, [d_inner, d_bc, d_bc], dim=-1)
    shape = (args.batch, args.seq)
    return scan(
        x.reshape(*shape, args.heads, args.head_dim),
        t["dt"],
        -torch.exp(t["A_log"].float()),
        B.reshape(*shape, args.groups, args.state),
        C.reshape(*shape, args.groups, args.state),
        chunk_size=args.chunk,
        D=t["D"],
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        dt_limit=(0.0, float("inf")),
        **extra,
    )


def kernel_scans(device: str) -> dict[str, ScanFn]:
    """The GPU kernels to time beside the torch scans: ours always on CUDA, mamba_ssm's when it imports."""
    if device != "cuda":
        return {}  # Triton's interpreter on a CPU is a correctness tool, far too slow to time
    scans: dict[str, ScanFn] = {}
    triton_scan = our_triton_scan()
    if triton_scan is not None:
        scans["triton"] = lambda x, dt, A, B, C, chunk_size, **kw: triton_scan(x, dt, A, B, C, **kw)
    mamba_ssm_scan = mamba_ssm_chunk_scan()
    if mamba_ssm_scan is not None:
        scans["mamba_ssm"] = mamba_ssm_scan
    return scans


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Variant:
    """One implementation pair timed on its own leaf tensors (so gradients never accumulate across variants)."""

    conv: ConvFn
    scan: ScanFn
    args: argparse.Namespace
    seq_idx: torch.Tensor | None = None
    tensors: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.tensors = make_inputs(self.args)

    def forward(self) -> torch.Tensor:
        return mixer_scan_path(self.conv, self.scan, self.tensors, self.args, self.seq_idx)

    def step(self) -> None:
        """Forward + backward, the unit that is timed."""
        self.forward().float().square().mean().backward()

    def memory(self) -> int:
        """CUDA: peak bytes allocated during one step. CPU: bytes of the storages autograd saves for backward."""
        if self.args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.step()
            return torch.cuda.max_memory_allocated() - base
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            self.forward()
        return sum(storages.values())


def measure(variants: dict[str, Variant], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median/min seconds per step; the variants are interleaved so load from other processes hits all alike."""
    for variant in variants.values():
        for _ in range(args.warmup):
            variant.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.iters):
        for name, variant in variants.items():
            _sync(args.device)
            start = time.perf_counter()
            variant.step()
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
    mem_key = "peak_bytes" if args.device == "cuda" else "saved_for_backward_bytes"
    return {
        name: {
            "seconds_median": statistics.median(times[name]),
            "seconds_min": min(times[name]),
            mem_key: variant.memory(),
        }
        for name, variant in variants.items()
    }


def packed_seq_idx(args: argparse.Namespace) -> torch.Tensor:
    """Rows of documents of varied lengths (roughly ``--docs`` per row), ids increasing along the row."""
    gen = torch.Generator().manual_seed(1)
    cuts = torch.randperm(args.seq - 1, generator=gen)[: args.docs - 1] + 1
    starts = torch.zeros(args.seq, dtype=torch.int32)
    starts[cuts] = 1
    return starts.cumsum(0).to(torch.int32).expand(args.batch, -1).contiguous().to(args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--state", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--conv-kernel", type=int, default=4)
    parser.add_argument("--docs", type=int, default=8, help="documents per row for the packed (ours-only) run")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/mamba.json"))
    parser.add_argument("--small", action="store_true", help="smoke run: S=256, 4 heads x 16, state 16, 2 timed runs")
    args = parser.parse_args()
    if args.small:
        args.seq, args.heads, args.head_dim, args.state, args.chunk, args.docs = 256, 4, 16, 16, 64, 4
        args.warmup, args.iters = 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    seq_idx = packed_seq_idx(args)
    variants = {
        "theirs_unpacked": Variant(hf.causal_conv1d_fn, hf.mamba2_chunk_scan, args),
        "ours_unpacked": Variant(our_conv, ssd_chunk_scan, args),
        "ours_packed": Variant(our_conv, ssd_chunk_scan, args, seq_idx=seq_idx),
    }
    for name, scan in kernel_scans(args.device).items():
        variants[f"{name}_unpacked"] = Variant(our_conv, scan, args)
        variants[f"{name}_packed"] = Variant(our_conv, scan, args, seq_idx=seq_idx)
    results = measure(variants, args)
    theirs = results["theirs_unpacked"]
    mem_key = "peak_bytes" if args.device == "cuda" else "saved_for_backward_bytes"
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        **results,
    }
    for name in variants:
        r = results[name]
        print(f"{name:20s} fwd+bwd {r['seconds_median'] * 1e3:8.2f} ms   {mem_key} {r[mem_key] / 2**20:9.1f} MiB")
        if name.endswith("_unpacked") and name != "theirs_unpacked":
            label = name.removesuffix("_unpacked")
            report[f"ratio_{label}_over_theirs"] = r["seconds_median"] / theirs["seconds_median"]
            report[f"memory_ratio_{label}_over_theirs"] = r[mem_key] / theirs[mem_key]
            print(
                f"  ratio {label}/theirs: time {report[f'ratio_{label}_over_theirs']:.3f}x, "
                f"memory {report[f'memory_ratio_{label}_over_theirs']:.3f}x"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
