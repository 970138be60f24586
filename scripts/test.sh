#!/usr/bin/env bash
# Set up (if needed) and run the linter and the test suite, offline, one torch thread.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
