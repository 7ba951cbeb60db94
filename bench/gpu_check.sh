#!/usr/bin/env bash
# One-time check on a machine with one NVIDIA GPU: the CUDA-only tests, then one full-width
# Fashion-MNIST VGG16 job through the service (dare serve, CUDA worker), and a table of stage
# times. Run from the repository root after `make install`:
#     bash bench/gpu_check.sh [EPOCHS] [PORT]
# EPOCHS (default 10) trains the subject; the paper saves a checkpoint per epoch of a full
# training, so more epochs give DARE a longer history to mine. Writes to gpu-check-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${1:-10}"
PORT="${2:-8765}"
OUT=gpu-check-out
PY=.venv/bin/python
DARE=.venv/bin/dare
[ -x "$PY" ] || { echo "gpu_check: run 'make install' first" >&2; exit 1; }
mkdir -p "$OUT"

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

echo "== CUDA-only tests"
$PY -m pytest -q -rs tests/engine/test_attacks.py -k cuda

echo "== train VGG16 (full width) on Fashion-MNIST, $EPOCHS epochs, cosine schedule, on CUDA"
t0=$(date +%s)
$DARE train-reference --arch vgg16 --dataset fashion --epochs "$EPOCHS" --lr-schedule cosine \
    --device cuda --out "$OUT/subject" > "$OUT/subject.json"
echo "trained in $(( $(date +%s) - t0 )) s: $($PY -c "import json; d=json.load(open('$OUT/subject.json')); print('test accuracy', round(d['test_accuracy'], 4))")"

echo "== the job through the service (dare serve, worker on CUDA)"
DARE_DEVICE=cuda DARE_TORCH_THREADS=4 DARE_LOG_FORMAT=text \
    $DARE serve --port "$PORT" --home "$OUT/home" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 1; done
t0=$(date +%s)
$DARE submit --url "http://127.0.0.1:$PORT" --model "$OUT/subject/model.onnx" \
    --history "$OUT/subject/history.zip" --dataset fashion --config '{"device": "cuda"}' \
    --wait --out "$OUT/artifacts"
echo "job finished in $(( $(date +%s) - t0 )) s (submission to last artifact)"

echo "== stage times (report.json timings_s)"
$PY - "$OUT/artifacts/report.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{'stage':<12}{'seconds':>10}")
for k, v in r["timings_s"].items():
    print(f"{k:<12}{v:>10.1f}")
ca = r["clean_accuracy"]
print(f"clean accuracy {ca['original']:.4f} -> {ca['hardened']:.4f} (within budget: {ca['within_budget']})")
PYEOF
