#!/usr/bin/env bash
# One short GPU session (about 5 minutes) for the sampling speed-ups, run from a fresh machine that
# has torch with CUDA but not this package installed:
#   OUT=/some/folder bash benchmarks/gpu_check.sh
# Checks against strict float32 eager: ADM's fp16 (convert_to_fp16) and fp16 / bf16 autocast, every
# scaled-dot-product-attention kernel, channels-last, torch.compile, CUDA graphs; finds the host
# synchronisations inside the sampling loop; runs scripts/image_sample.py with the speed switches
# (CUDA graphs, fp16) and at two batch sizes (are the bytes equal on a GPU too?); runs a 2-rank
# nccl all_reduce through torchrun when the machine has 2 or more GPUs; and measures the
# ImageNet-64 and CIFAR-10 forward and sampling throughput at two batch sizes each. Writes
# $OUT/gpu_results.md and $OUT/gpu_results.json (plus nccl.json and gpu_check.log). Without CUDA it
# runs the same code on the CPU with a tiny model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-320}"   # the whole script, nccl included
started=$SECONDS

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
echo "gpu_check: $gpus CUDA device(s); results in $OUT"
if [ "$gpus" -ge 2 ]; then
    if ! timeout 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
            benchmarks/bench_sampling.py nccl-check --out "$OUT" >"$OUT/nccl.log" 2>&1; then
        echo '{"ok": false, "error": "the torchrun launch failed; see nccl.log"}' >"$OUT/nccl.json"
    fi
else
    echo "{\"skipped\": \"$gpus CUDA device(s): the 2-rank nccl check needs 2 or more\"}" >"$OUT/nccl.json"
fi

left=$((BUDGET_S - (SECONDS - started)))
if [ "$left" -lt 40 ]; then
    echo "gpu_check: BUDGET_S=$BUDGET_S leaves ${left} s after the nccl check; give it 40 s or more" >&2
    exit 2
fi
# The Python side stops starting new measurements 30 s before its share ends; timeout is the backstop.
timeout "$left" "$PY" benchmarks/bench_sampling.py gpu-check --out "$OUT" --deadline_s $((left - 30)) 2>&1 \
    | grep --line-buffered -v '^USDT' | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ]; then
    # Not 124: the caller's own time limit reports that code.
    echo "gpu_check: stopped at the time budget; $OUT/gpu_results.* hold what was measured" | tee -a "$OUT/gpu_check.log"
    status=3
fi
echo "gpu_check: done in $((SECONDS - started)) s (exit $status)"
exit "$status"
