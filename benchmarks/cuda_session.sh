#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go (a lent GPU machine is held by the minute):
# the kernel tests on the GPU (the Triton kernels compiled for real, not interpreted), then the
# GPU half of benchmarks/moe_layer.py with every tuning candidate's time logged.
#   bash benchmarks/cuda_session.sh [OUTDIR]      (OUTDIR defaults to $OUT, else ./cuda-session)
# Uses the machine's own python3 with torch, triton and transformers; sparsify from this checkout.
set -uo pipefail
out=${1:-${OUT:-cuda-session}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
# The tests' shapes are tiny: take the first fitting tile instead of timing every candidate.
# test_triton_sm90 compiles for an H100 without one (for CI): here the kernels compile for real.
# SKIP_TESTS=1: the benchmark alone (when a short lease is better spent on timings).
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    SPARSIFY_TRITON_TUNE=0 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/kernels -p no:cacheprovider \
        -o addopts="" -q --maxfail=5 --ignore tests/kernels/test_triton_sm90.py 2>&1 | tee "$out/tests.log" \
        | tail -n 15
fi
SPARSIFY_TRITON_TUNE_LOG="$out/tune.jsonl" timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/moe_layer.py \
    --device cuda --profile ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.jsonl"
python3 - "$out/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if "faster_in_rounds" in r:
        print(f"{r['tokens']:>6} {r['impl']:<58} speedup {r['speedup_median']} "
              f"({r['speedup_min']}-{r['speedup_max']}), faster in {r['faster_in_rounds']} rounds")
    elif "median_ms" in r:
        extra = {k: r[k] for k in ("ratio_to_dense", "time_over_bound", "rel_err_vs_reference") if k in r}
        print(f"{r['tokens']:>6} {r['impl']:<34} {r['median_ms']:>9} ms  {extra}")
PY
