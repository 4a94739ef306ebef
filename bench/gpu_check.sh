#!/usr/bin/env bash
# GPU check for issue 5, for a session that has the device tool lent (one run, < 5 min):
#   run(command="bash bench/gpu_check.sh", timeout_s=420)
# Full fine-tune on CUDA with bf16 autocast + channels_last through `transferkit train`, against a bare timm
# loop on the same model, data and batch size (bench/transfer.py --overhead picks CUDA when present).
# Needs the project installed there (make install); the device machine reaches no registry, so this only
# works where torch/timm are already importable. Results land in $OUT (or bench/.work/transfer/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
timeout 280 "$PY" -m bench.transfer --overhead | tee "${OUT:-/tmp}/gpu_overhead.json"
