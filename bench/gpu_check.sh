#!/usr/bin/env bash
# GPU check for modelloop (run by the lead on a machine with an NVIDIA GPU; not in CI).
#
#   bash bench/gpu_check.sh            # from the repository root; ~5 minutes
#
# 1. installs the project with the [gpu] extra into .venv-gpu (CUDA and cuDNN wheels);
# 2. builds the heavy model (bench/.cache) if it is missing;
# 3. in-process: an ONNX Runtime session asked for CUDA must report CUDAExecutionProvider
#    first in session.get_providers() (no silent fallback), and its outputs must match the
#    CPU session within 1e-4;
# 4. serves the heavy model with onnx_providers = [CUDA, CPU] and checks the server's log
#    line "ONNX Runtime providers ['CUDAExecutionProvider', ...]" and the absence of the
#    fallback warning, then checks served outputs against CPU within 1e-4;
# 5. runs the heavy-model table (python -m bench --only heavy) on the GPU server, with 1, 2,
#    4 and 8 workers (the worker-scaling run): the servers get all CPUs but the last quarter,
#    which the load generators get (BENCH_SERVER_CPUS / BENCH_LOAD_CPUS).
# Exit status 0 only if every check passed. Results land in bench/results/gpu-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv-gpu}
PY=${PYTHON:-python3.11}
DURATION=${DURATION:-10}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu-card.txt"

echo "== install (.[gpu,dev]) into $VENV"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip==25.3
"$VENV/bin/python" -m pip install --quiet -c requirements.lock -e '.[gpu,dev]'
command -v wrk >/dev/null && command -v h2load >/dev/null || {
  echo "installing wrk and h2load"; sudo apt-get install -y wrk nghttp2-client >/dev/null; }

echo "== heavy model"
"$VENV/bin/python" -c "from bench.models import ensure_heavy; print(ensure_heavy())"
REPO=$(mktemp -d)/repo
trap 'rm -rf "$(dirname "$REPO")"' EXIT
mkdir -p "$REPO"
cp -r bench/.cache/heavy-repo/heavy "$REPO/heavy"
# The GPU gets the batches: same batching as the CPU table, providers pinned to CUDA then CPU.
cat > "$REPO/heavy/config.json" <<'JSON'
{"batching": {"enabled": true, "max_batch_size": 32, "batch_timeout_micros": 1000, "num_batch_threads": 1},
 "onnx_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
JSON

echo "== in-process: CUDA really chosen, outputs match CPU within 1e-4"
"$VENV/bin/python" - "$REPO/heavy/1/model.onnx" <<'PY'
import sys
import numpy as np
import onnxruntime as ort

model = sys.argv[1]
print("onnxruntime", ort.__version__, "available:", ort.get_available_providers())
gpu = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
cpu = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
print("session.get_providers():", gpu.get_providers())
assert gpu.get_providers()[0] == "CUDAExecutionProvider", "CUDA was not chosen: silent fallback to CPU"
x = np.random.default_rng(0).random((64, 784), dtype=np.float32)
diff = float(np.max(np.abs(gpu.run(None, {"pixels": x})[0] - cpu.run(None, {"pixels": x})[0])))
print(f"max |GPU - CPU| = {diff:.2e}")
assert diff <= 1e-4, f"GPU and CPU outputs differ by {diff}"
PY

echo "== served: provider log line, no fallback, outputs match CPU"
LOG=$(mktemp)
"$VENV/bin/python" -m modelloop serve --repo "$REPO" --rest-port 0 --grpc-port 0 --no-monitoring \
  >"$LOG" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
trap 'cleanup; rm -rf "$(dirname "$REPO")"' EXIT
for _ in $(seq 1 120); do grep -q "REST listening on" "$LOG" && break; sleep 1; done
REST=$(grep -o 'REST listening on http://[^ ]*' "$LOG" | awk '{print $4}')
grep "ONNX Runtime providers" "$LOG"
grep -q "ONNX Runtime providers \['CUDAExecutionProvider'" "$LOG" || { echo "FAIL: server did not choose CUDA"; cat "$LOG"; exit 1; }
if grep -q "fell back" "$LOG"; then echo "FAIL: provider fallback logged"; cat "$LOG"; exit 1; fi
"$VENV/bin/python" - "$REST" "$REPO/heavy/1/model.onnx" <<'PY'
import json, sys, urllib.request
import numpy as np
import onnxruntime as ort

rest, model = sys.argv[1], sys.argv[2]
x = np.random.default_rng(1).random((4, 784), dtype=np.float32)
req = urllib.request.Request(f"{rest}/v1/models/heavy:predict", data=json.dumps({"instances": x.tolist()}).encode(),
                             headers={"Content-Type": "application/json"})
served = np.asarray(json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"], np.float32)
cpu = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
diff = float(np.max(np.abs(served - cpu)))
print(f"served (CUDA) vs in-process CPU: max diff {diff:.2e}")
assert diff <= 1e-4, diff
PY
cleanup

echo "== heavy-model table on the GPU, workers 1, 2, 4 and 8"
CPUS=$(nproc)
LOAD=$(( CPUS / 4 > 0 ? CPUS / 4 : 1 ))
if [ "$CPUS" -ge 4 ]; then
  export BENCH_SERVER_CPUS="0-$(( CPUS - LOAD - 1 ))" BENCH_LOAD_CPUS="$(( CPUS - LOAD ))-$(( CPUS - 1 ))"
fi
"$VENV/bin/python" -m bench --only heavy --heavy-workers 1,2,4,8 --duration "$DURATION" \
  --out "$OUT" --gpu | tee "$OUT/gpu-table.md"
echo "GPU check passed on: $(cat "$OUT/gpu-card.txt")"
