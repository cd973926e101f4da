#!/usr/bin/env bash
# GPU check of the full-scale path (SD1.5 / SD3.5 shapes, random init, 512 px, LoRA, bf16, one GPU):
# step time and peak memory per profile × method family → JSON. Budget: under 8 minutes on one H100.
#   scripts/gpu_check.sh [OUT.json]        (default: $OUT/gpu_check.json if $OUT is set, else results/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${1:-${OUT:-results}/gpu_check.json}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || { echo "gpu_check: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))"; exit 2; }
timeout 470 "$PY" scripts/gpu_check.py --out "$out"
echo "wrote $out"
