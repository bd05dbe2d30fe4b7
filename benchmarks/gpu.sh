#!/usr/bin/env bash
# Streaming overhead on a CUDA GPU: the same benchmark as on CPU, with sdpa and (when installed) flash attention.
# Usage: bash benchmarks/gpu.sh [docs/benchmarks-gpu.md]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-}"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU"
print(torch.cuda.get_device_name(0))
PY
export HF_VATTR_BENCH_DEVICE=cuda
for impl in sdpa flash_attention_2; do
  if [ "$impl" = flash_attention_2 ] && ! python -c "import flash_attn" 2>/dev/null; then
    echo "flash-attn not installed: skipping flash_attention_2"; continue
  fi
  python benchmarks/bench_streamer.py --device cuda --attn "$impl" --layers 28 --steps 64 --repeats 3 \
    --contexts 512 2048 8192 16384 32768 ${out:+--write "$out"}
done
