#!/usr/bin/env bash
# One short GPU check, without Ray (the GPU image has JAX with CUDA, flax, orbax and numpy).
#   - the engine tests that need no torch (decode consistency, paged == dense, TP, sampling),
#     which run the Pallas paged attention there, and the attention tests (Pallas == reference);
#   - the engine benchmark on the ~1B-parameter preset (bfloat16), no HF baseline.
# Pure-Python packages the image lacks (pytest, safetensors, tokenizers, tqdm) travel as wheels
# in .whl/ (see the device tool's README); results go to $OUT (or ./out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_attention.py 2>&1 | tee "$OUT/tests.log"
timeout 300 python3 scripts/bench_engine.py --model bench-1b-random --no-hf --json "$OUT/bench_gpu.json" \
  2>&1 | tee "$OUT/bench.log"
