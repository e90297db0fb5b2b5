#!/usr/bin/env bash
# Set up .venv with sinktrace and its test tools. Idempotent: a second run installs nothing new.
# torch is installed first and pinned to 2.13.0. Which build pip fetches is decided by its index: the default index
# (PyPI) serves the CUDA build on Linux; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU build.
# Set TORCH_SPEC to keep a build you already chose, e.g. TORCH_SPEC="torch" on a GPU machine whose environment has one.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
  "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# litgpt's own model is a test oracle for its key map. Its pins (huggingface-hub<1.4) conflict with transformers 5 and
# its extras pull torchvision, which breaks on torch 2.13; its model code needs only lightning (in the test extra).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "litgpt==0.5.13"
