#!/usr/bin/env bash
# The GPU check (one H100, < 5 minutes): the parity tests on the GPU, then benchmarks 1 and 2 at
# DeepSeek-V2-Lite layer sizes in bf16, and the planner against the device's own memory readout. benchmarks/moe_layer.py's "ratio" column is the MoE layer's
# achieved FLOP/s over the card's measured dense-matmul FLOP/s for the same FLOPs (MFU against the
# matmul rate measured in the same run).
#   PYTHON=/path/to/python-with-jax[cuda] bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/benchmarks:${PYTHONPATH:-}"
$PY -c "import jax; assert jax.default_backend() == 'gpu', f'no GPU backend: {jax.devices()}'; print(jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 150 $PY -m pytest -q -x tests/test_experts.py tests/test_forward.py tests/test_hf_parity.py
# one V2-Lite MoE layer: 8K tokens, hidden 2048, 64 experts of width 1408, top-6
timeout 75 $PY benchmarks/moe_layer.py --tokens 8192 --hidden 2048 --width 1408 --experts 64 --dtype bfloat16 \
    --strategies ragged,tokamax,blocked,capacity:1.25
timeout 75 $PY benchmarks/train_step.py --size large --no-torch --batch 8 --seq 1024
# esft plan's prediction against the GPU's peak bytes in use, per method
timeout 90 $PY benchmarks/plan_check.py --size large --batch 8 --seq 1024
