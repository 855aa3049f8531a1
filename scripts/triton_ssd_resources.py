"""Build our Triton SSD kernels for a GPU architecture without a GPU, and report registers and spills.

Why: CI and most dev machines have no GPU, and Triton's interpreter (which the tests use for numerics) never
runs the GPU compiler. This runs the real pipeline (TTIR -> PTX -> cubin with the ``ptxas`` the Triton wheel
ships) at the launch shape ``families/nemotron_h_mamba/triton_ssd.py`` uses, so a kernel that does not compile for the
target, or that spills registers to local memory, is caught on a CPU. It is also how that launch shape was
chosen (``--sweep``).

    python scripts/triton_ssd_resources.py [--arch 90] [--state 128] [--dtype bf16] [--sweep] [--out FILE]

Exit status 1 when a kernel spills at the shipped launch shape (``STACK`` > 0 bytes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):  # interpreted kernels cannot be compiled: restart without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mtp_recipes.families.nemotron_h_mamba import triton_ssd  # noqa: E402

KERNELS = {
    "forward": (triton_ssd._ssd_fwd_kernel, triton_ssd.CHUNK_TOKENS),
    "backward_dq": (triton_ssd._ssd_bwd_dq_kernel, triton_ssd.BACKWARD_CHUNK_TOKENS),
    "backward_dkv": (triton_ssd._ssd_bwd_dkv_kernel, triton_ssd.BACKWARD_CHUNK_TOKENS),
}
CONSTEXPRS = ("BT", "BK", "BV", "PRECISION")
FP32_POINTERS = ("g", "dq_part", "dk_part")


def signature(fn: triton.JITFunction, dtype: str) -> dict[str, str]:
    """Triton argument types: tensors of the input dtype, fp32 decay and partial sums, int32 sizes."""
    types = {}
    for name in fn.arg_names:
        if name in CONSTEXPRS:
            types[name] = "constexpr"
        elif name == "cu_seqlens":
            types[name] = "*i32"
        elif name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name.isupper():
            types[name] = "i32"
        else:
            types[name] = f"*{dtype}"
    return types


def resources(fn: triton.JITFunction, arch: int, dtype: str, bt: int, bk: int, bv: int, warps: int) -> dict:
    """Compile one kernel for ``sm_<arch>`` and read registers / stack (spill) bytes from the cubin."""
    precision = "ieee" if dtype == "fp32" else "tf32"
    source = ASTSource(fn=fn, signature=signature(fn, dtype),
                       constexprs={"BT": bt, "BK": bk, "BV": bv, "PRECISION": precision})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {usage[-500:]}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2)), "chunk_tokens": bt,
            "value_block": bv, "num_warps": warps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100), 90 (H100)")
    parser.add_argument("--state", type=int, default=128, help="ssm_state_size (Nemotron-H: 128)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--sweep", action="store_true", help="also list chunk length x value block x warps")
    parser.add_argument("--out", type=Path, default=Path("bench_results/triton_ssd_resources.json"))
    args = parser.parse_args()

    bk, bv = triton_ssd._blocks(args.state, args.head_dim)
    report = {"arch": args.arch, "dtype": args.dtype, "state": args.state, "triton": triton.__version__,
              "shipped": {}, "sweep": []}
    for name, (fn, bt) in KERNELS.items():
        row = resources(fn, args.arch, args.dtype, bt, bk, bv, triton_ssd.NUM_WARPS)
        report["shipped"][name] = row
        print(f"{name:13s} sm_{args.arch} {args.dtype} BT={bt} BK={bk} BV={bv} warps={triton_ssd.NUM_WARPS}: "
              f"{row['registers']} registers, {row['stack_bytes']} bytes spilled")
    if args.sweep:
        for (name, (fn, _)), bt, sweep_bv, warps in itertools.product(KERNELS.items(), (32, 64), (16, 32), (4, 8)):
            row = {"kernel": name, **resources(fn, args.arch, args.dtype, bt, bk, sweep_bv, warps)}
            report["sweep"].append(row)
            print(f"  sweep {name:13s} BT={bt} BV={sweep_bv} warps={warps}: {row['registers']} registers, "
                  f"{row['stack_bytes']} bytes spilled")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 1 if any(row["stack_bytes"] for row in report["shipped"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
