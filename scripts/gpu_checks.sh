#!/usr/bin/env bash
# The checks that need a GPU, one stage per call, each sized to fit a 10-minute command (the device tool's limit).
#
#   bash scripts/gpu_checks.sh env      # versions: torch, transformers, triton, mamba_ssm, GPU
#   bash scripts/gpu_checks.sh tests    # GPU-marked tests + the suites whose kernels run for real on CUDA
#   bash scripts/gpu_checks.sh mamba    # bench_mamba at the anchor's 1.2B mixer shape (ours: torch + Triton)
#   bash scripts/gpu_checks.sh loss     # bench_loss at T=8192 H=4096 V=131072, D=0,1,3
#   bash scripts/gpu_checks.sh step     # bench_step: the anchor 1.2B Nemotron-H, B=1,2, S=4096
#   bash scripts/gpu_checks.sh ep       # 2+ GPUs: DeepSeek-V3 debug recipe tokens/s, trainer.ep=1 vs ep=all GPUs
#
# Results land in $OUT when it is set (the device tool brings that folder back), else in bench_results/;
# copy the figures into docs/benchmarks.md with the date and device.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_results}"
mkdir -p "$out" bench_results
# Keep Triton's autotune/compile cache between calls of one session.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/bench_results/triton_cache}"

case "${1:-}" in
  env)
    python - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("transformers", "triton", "mamba_ssm", "causal_conv1d", "flash_attn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "unavailable:", type(exc).__name__)
from mtp_recipes.families.nemotron_h_mamba.kernels import scan_backend
print("mamba scan on cuda:", scan_backend(torch.empty(0, device="cuda")))
EOF
    ;;
  tests)
    { timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests
      timeout 360 python -m pytest -q -p no:cacheprovider tests/families/nemotron_h_mamba/test_triton_ssd.py \
        tests/mtp/test_packed_equivalence.py tests/loss; } 2>&1 | tee "$out/gpu_tests.txt"
    ;;
  mamba)
    timeout 570 python benchmarks/bench_mamba.py --device cuda --dtype bfloat16 --seq 4096 --heads 64 \
      --head-dim 64 --state 128 --groups 8 --out "$out/mamba.json"
    ;;
  loss)
    timeout 570 python benchmarks/bench_loss.py --out "$out/loss.json"
    ;;
  step)
    timeout 570 python benchmarks/bench_step.py --out "$out/step.json"
    ;;
  ep)
    n=$(python -c "import torch; print(torch.cuda.device_count())")
    if [ "$n" -lt 2 ]; then echo "ep: needs 2 or more GPUs, found $n" | tee "$out/ep.txt"; exit 0; fi
    for ep in 1 "$n"; do  # 4 experts per GPU, so that ep=n divides them
      timeout 270 torchrun --nproc_per_node "$n" -m mtp_recipes.finetune model=deepseek_v3_debug \
        model.config.n_routed_experts=$((4 * n)) trainer.ep="$ep" trainer.max_steps=40 trainer.eval_every=0 \
        trainer.progress_bar=false data.seq_len=1024 data.batch_size=4 trainer.overwrite=true \
        hydra.run.dir="$out/ep$ep"
    done
    for ep in 1 "$n"; do
      echo "trainer.ep=$ep on $n GPUs: $(python benchmarks/records.py "$out/ep$ep" 5) tokens/s (median of steps 6-40)"
    done | tee "$out/ep.txt"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
