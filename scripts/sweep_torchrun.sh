#!/usr/bin/env bash
# One torchrun job per sweep point, run one after another.
#
#   scripts/sweep_torchrun.sh NPROC "KEY=V1,V2,..." [OVERRIDE ...]
#
# Hydra's multirun (-m) launches its jobs inside one process, and torchrun starts N processes that each
# run Hydra: the two do not compose. This script expands the sweep itself and starts
#
#   torchrun --standalone --nproc_per_node NPROC -m mtp_recipes.finetune [OVERRIDE ...] KEY=Vi \
#       hydra.run.dir=runs/sweep/<name>/<Vi>
#
# for every value Vi. OVERRIDE arguments (e.g. --config-name nemotron_super, model.path=..., data.source=...)
# are passed to every run unchanged. Values are split on commas, so a swept value cannot contain one.
#
# Environment:
#   SWEEP_NAME    directory name under runs/sweep (default: <date>_<time>_<KEY>); reuse a name together
#                 with trainer.resume=auto to continue an interrupted sweep in the same run directories
#   SWEEP_ROOT    parent directory (default: runs/sweep)
#   TORCHRUN      torchrun command (default: torchrun)
#   TORCHRUN_ARGS replaces --standalone, e.g. "--nnodes 2 --rdzv_backend c10d --rdzv_endpoint host:29500"
#   DRY_RUN=1     print the commands without running them
#
# Every point runs even when an earlier one fails; the exit status is 1 if any point failed.
set -uo pipefail

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC \"KEY=V1,V2,...\" [OVERRIDE ...]  (--help for more)" >&2
  exit 2
fi

nproc=$1
sweep=$2
shift 2
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC must be a positive integer, got '$nproc'" >&2
  exit 2
fi
if [[ "$sweep" != *=* ]]; then
  echo "error: the sweep must look like KEY=V1,V2,... (got '$sweep')" >&2
  exit 2
fi
key=${sweep%%=*}
IFS=',' read -r -a values <<< "${sweep#*=}"
if [ ${#values[@]} -eq 0 ] || [ -z "$key" ]; then
  echo "error: no key or no values in '$sweep'" >&2
  exit 2
fi

name=${SWEEP_NAME:-$(date +%Y-%m-%d_%H-%M-%S)_${key}}
root=${SWEEP_ROOT:-runs/sweep}/${name}
read -r -a launcher <<< "${TORCHRUN:-torchrun}"
if [ -n "${TORCHRUN_ARGS:-}" ]; then
  read -r -a rdzv <<< "$TORCHRUN_ARGS"
else
  rdzv=(--standalone)
fi

failed=()
for value in "${values[@]}"; do
  if [ -z "$value" ]; then
    echo "error: empty value in '$sweep'" >&2
    exit 2
  fi
  # The value names its run directory; '/' would nest it, so it is replaced.
  dir="${root}/${value//\//_}"
  cmd=("${launcher[@]}" "${rdzv[@]}" --nproc_per_node "$nproc" -m mtp_recipes.finetune
       "$@" "${key}=${value}" "hydra.run.dir=${dir}")
  echo "== ${key}=${value} -> ${dir}"
  echo "   ${cmd[*]}"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    continue
  fi
  if ! "${cmd[@]}"; then
    echo "== ${key}=${value} FAILED (see ${dir})" >&2
    failed+=("$value")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "== sweep ${root}: ${#failed[@]} of ${#values[@]} failed: ${failed[*]}" >&2
  exit 1
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "== sweep ${root}: ${#values[@]} runs (dry run, nothing started)"
else
  echo "== sweep ${root}: ${#values[@]} runs done"
fi
