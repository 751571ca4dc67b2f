#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (under 10 minutes once the venv exists; benchmarks/README.md):
# 1. the verify cost curve: ms per transformers-backend step of a chain of N nodes for B rows, fp16, on a random-weight
#    Llama of Vicuna-7B's shape (benchmarks/cost_curve.py --random-llama vicuna-7b; built on the GPU, no download);
# 2. Medusa vs plain tokens/s for the embedded model in fp16 on the GPU (benchmarks/ceiling.py);
# 3. pytest -m gpu tests/test_gpu.py (fp16/bf16 teacher-forced against fp32, batched == alone, serve_config.gpu.yaml).
#    bash benchmarks/gpu_check.sh
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU with a tiny random Llama and few tokens (the gpu tests skip):
# a smoke test of this script on a machine without a GPU, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
[ -x .venv/bin/python ] || bash .ci/install
PY=.venv/bin/python

echo "== device"
"$PY" - "$DEVICE" <<'EOF'
import sys

import torch

if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}). A CPU-only wheel? "
             "Reinstall torch==2.13.0 from a CUDA index into .venv, or GPU_CHECK_DEVICE=cpu for a smoke test.")
print(torch.__version__, torch.cuda.get_device_name(0) if sys.argv[1] == "cuda" else "cpu")
EOF

if [ "$DEVICE" = cuda ]; then
    SHAPE=vicuna-7b NODES="1 2 4 8 16 32 64" BATCHES="1 4 8" CONTEXT=200 LONG=1000 REPEATS=5 TOKENS=64
    DTYPE=float16
else  # smoke test: tiny sizes (fp16 on the CPU is slow; bf16 runs the same code)
    SHAPE=tiny NODES="1 4 16" BATCHES="1 2" CONTEXT=20 LONG=20 REPEATS=1 TOKENS=8
    DTYPE=bfloat16
fi

echo "== verify cost curve: transformers $DTYPE, random $SHAPE, $DEVICE"
# shellcheck disable=SC2086  # the lists are meant to split
"$PY" benchmarks/cost_curve.py --encodings --hf "$DTYPE" --device "$DEVICE" --random-llama "$SHAPE" \
    --nodes $NODES --batch-sizes $BATCHES --context "$CONTEXT" --long "$LONG" --repeats "$REPEATS" \
    --out "benchmarks/results/gpu_cost_curve_$DEVICE"

echo "== Medusa vs plain tokens/s: embedded model, $DTYPE, $DEVICE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The embedded config on the device; adaptive off (ceiling.py names its trees, and the policy would time every tree
# on startup).
"$PY" - "$DEVICE" "$DTYPE" "$tmp/model.yaml" <<'EOF'
import sys

import yaml

device, dtype, out = sys.argv[1:]
data = yaml.safe_load(open("configs/smollm2-135m.yaml"))
data["base_model"].update(device=device, dtype=dtype)
data["tree"].pop("adaptive", None)
yaml.safe_dump(data, open(out, "w"))
EOF
"$PY" benchmarks/ceiling.py --config "$tmp/model.yaml" --tokens "$TOKENS" \
    $([ "$DEVICE" = cuda ] || echo --trees mc_16)

echo "== pytest -m gpu tests/test_gpu.py"
# The serve test starts Ray, and `ray stop` elsewhere stops every cluster on the machine: hold the shared lock.
flock /tmp/medusa_ray.lock "$PY" -m pytest -m gpu tests/test_gpu.py -s -ra
