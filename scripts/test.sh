#!/usr/bin/env bash
# The README's test command: set up, then lint, check generated code, and run every test.
# The tests start what they need on 127.0.0.1 themselves (in-process Ray, SeaweedFS, PostgreSQL)
# and stop it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# System tools the tests use: PostgreSQL server binaries, docker-compose (offline validation),
# Chromium (the console's browser tests) and promtool (checks /metrics scrapes; from prometheus).
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v docker-compose >/dev/null || need+=(docker-compose)
[ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null || need+=(chromium)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]}..." >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "missing system packages: ${need[*]} (install them, e.g. apt-get install ${need[*]})" >&2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy orchestrator adapters_store agent pocketlora
.venv/bin/python scripts/gen_protos.py --check
exec .venv/bin/python -m pytest -q "$@"
