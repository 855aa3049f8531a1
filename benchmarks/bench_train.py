"""Step time of the real training entry point: with and without MTP, on 1 and N processes.

Runs ``python -m mtp_recipes.finetune`` (or ``torchrun --nproc_per_node N -m mtp_recipes.finetune``) on
the debug Nemotron-H, once per (processes, D) pair, and reads tokens/s from each run's metrics.jsonl
(median over the steps after warm-up). Prints the MTP overhead ratio step(D=1)/step(D=0) per process
count, next to the FLOP-predicted ratio, and the N-process/1-process throughput ratio.

    python benchmarks/bench_train.py                       # CPU, debug model, 1 and 2 processes
    python benchmarks/bench_train.py --quick               # smoke run: 1 process, 4 steps, S=64
    python benchmarks/bench_train.py --nproc 1 8 -- model.dtype=float32 data.seq_len=4096 ...   # GPU node

Extra Hydra overrides after ``--`` go to every run (e.g. a bigger ``model.config`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from records import median_tokens_per_s

from mtp_recipes.metrics import flops_per_token
from mtp_recipes.model import MTPModel

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, depths: int, steps: int, overrides: list[str], workdir: Path) -> float:
    """Median tokens/s of one training run (global, all processes) after the first few steps."""
    run_dir = workdir / f"p{nproc}_d{depths}"
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    )
    cmd = [
        *launcher,
        "-m",
        "mtp_recipes.finetune",
        f"mtp.num_layers={depths}",
        f"trainer.max_steps={steps}",
        "trainer.progress_bar=false",
        "trainer.save_final=false",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    subprocess.run(cmd, check=True, env=env, cwd=workdir, capture_output=True, text=True)
    return median_tokens_per_s(run_dir)


def predicted_overhead() -> float:
    """flops(D=1) / flops(D=0) of the debug model (``model.config`` overrides are not reflected)."""
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / "nemotron_h_debug.yaml").config)
    return flops_per_token(MTPModel.from_config(config, num_layers=1)) / flops_per_token(
        MTPModel.from_config(config, num_layers=0)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="bench_results/train.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 process, 4 steps, S=64, 2 rows a batch")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    overrides = args.overrides or ["data.seq_len=256", "data.batch_size=4"]
    if args.quick:
        args.nproc, args.steps = [1], 4
        overrides = [*overrides, "data.seq_len=64", "data.batch_size=2", "data.max_documents=20"]

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in args.nproc:
            for depths in (0, 1):
                tps = run(nproc, depths, args.steps, overrides, Path(tmp))
                results[f"p{nproc}_d{depths}"] = tps
                print(f"{nproc} process(es), D={depths}: {tps:,.0f} tokens/s", flush=True)
    predicted = predicted_overhead()
    summary = {"tokens_per_s": results, "predicted_mtp_overhead": predicted, "overrides": overrides}
    for nproc in args.nproc:
        ratio = results[f"p{nproc}_d0"] / results[f"p{nproc}_d1"]
        summary[f"mtp_overhead_p{nproc}"] = ratio
        print(f"{nproc} process(es): MTP overhead step(D=1)/step(D=0) = {ratio:.3f} (FLOP-predicted {predicted:.3f})")
    if len(args.nproc) > 1:
        first, last = args.nproc[0], args.nproc[-1]
        scale = results[f"p{last}_d1"] / results[f"p{first}_d1"]
        summary["scaling_d1"] = scale
        print(f"throughput {last} vs {first} process(es), D=1: {scale:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
