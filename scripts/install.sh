#!/usr/bin/env bash
# Set up .venv with sinktrace and its test tools. Idempotent: a second run installs nothing new.
# torch is installed first and pinned to 2.13.0 (the CPU build); set TORCH_SPEC to keep a CUDA build you already chose,
# e.g. TORCH_SPEC="torch" on a GPU machine whose environment has one.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
