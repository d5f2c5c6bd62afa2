#!/usr/bin/env bash
# The one GPU check (docs: bench/RESULTS.md), run on a lent GPU machine from the repo root:
# builds the extension with its CUDA kernels, runs the GPU tests and bench/run.py --device cuda,
# and leaves logs and JSON under $OUT (default /tmp/nl-gpu). Peer packages carried as wheels in
# .whl/ (flash-linear-attention) are installed to /tmp/site first.
#
#   OUT=/tmp/nl-gpu bash scripts/gpu_check.sh [bench ops...]    (default: every op and step)
set -uo pipefail
OUT=${OUT:-/tmp/nl-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=".:${PYTHONPATH:-}"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
echo "== build"
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "pip install -e failed; building in place" | tee -a "$OUT/build.log"
  $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
fi
echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
grep -E "nested_learning setup|error|Error" "$OUT/build.log" | head -20
$PY -c "import nested_learning as nl; print(nl.build_info()); from nested_learning import ops; print(ops.available_backends('dgd_update', 'cuda'))" 2>&1 | tee -a "$OUT/build.log"
echo "== GPU tests"
$PY -m pytest -q -m gpu -p no:cacheprovider tests/ops 2>&1 | tee "$OUT/tests.log" | tail -30
echo "== probes"
$PY bench/probe_cms.py --json "$OUT/probe_cms.json" 2>&1 | tee "$OUT/probe_cms.log"
$PY bench/profile_step.py --device cuda --size pilot --batch 4 --seq 1024 --repeat 3 --rows 15 2>&1 \
  | tee "$OUT/profile_hope_pilot_cuda.txt" | head -4
echo "== bench"
OPS=("$@")
[ ${#OPS[@]} -eq 0 ] && OPS=(dgd_update titan_update titan_mlp_update cms_update linear_cross_entropy step)
$PY bench/run.py --device cuda --dtype bfloat16 --ops "${OPS[@]}" --json "$OUT/bench_cuda_bf16.json" 2>&1 \
  | tee "$OUT/bench.log"
