#!/usr/bin/env bash
# Create .venv and install steindiff with its dependencies; --dev adds the test tools.
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, installed first so that pip
# does not resolve a different build through the other requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
requirements=(-r requirements.txt)
if [ "${1:-}" = "--dev" ]; then
  requirements+=(-r requirements-dev.txt)
fi
"${pip[@]}" "${requirements[@]}"
"${pip[@]}" --no-deps --no-build-isolation -e .
