#!/usr/bin/env bash
# Run the test suite on the versions that matter, each in a fresh venv of its own, and record each row (result,
# pytest summary, time, commit, date) in docs/compatibility.md:
#   - every transformers minor that pyproject.toml allows (its newest patch) with the lowest allowed torch;
#   - the serving engines' exact pins (vLLM 0.34.0: torch 2.14.0 + transformers 5.22.2; SGLang 0.5.23: torch
#     2.14.1 + transformers 5.19.0), which are also the newest torch releases allowed.
#
#   bash scripts/check_versions.sh                       # the whole matrix (rows already in the doc are replaced)
#   bash scripts/check_versions.sh --list                # the matrix, one TORCH:TRANSFORMERS row per line
#   bash scripts/check_versions.sh 2.13.0:5.25.0         # some rows only
#   bash scripts/check_versions.sh --newest              # the newest transformers release, whatever the range
#                                                        # says: one verdict line (exit 1 unless green)
# Venvs live under --venv-root (default /tmp/mtp_versions) and are reused. torch 2.13.0 is a CPU build on these
# machines; 2.14.x are CUDA builds that run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/check_versions.py "$@"
