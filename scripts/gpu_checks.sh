#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA-only tests, the GPU benchmark rows of docs/speed.md and the
# full-mode training run of docs/training.md. Each part writes its log (and tables) into OUTDIR.
#
#   bash scripts/gpu_checks.sh OUTDIR [tests] [bench] [compile] [train]     (default: tests bench train)
#
# Needs the reference data (ANYSEG_SHARED, default ../shared) for the tests and the quality rows.
# PYTHON (default python3) must have torch with CUDA and anyseg importable.
set -u
out=${1:?usage: gpu_checks.sh OUTDIR [tests] [bench] [compile] [train]}
shift
parts=${*:-tests bench train}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export ANYSEG_SHARED=${ANYSEG_SHARED:-$(cd "$(dirname "$0")/.." && pwd)/../shared}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, report the status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    return 0
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

for part in $parts; do
    case $part in
    tests)
        step tests 150 $py -m pytest -q -rs -p no:cacheprovider tests/test_fast_paths.py -k "gpu or cuda" ;;
    bench)
        step bench ${BENCH_LIMIT:-420} $py -m anyseg bench --device cuda --amg-side 32 \
            --tasks ${BENCH_TASKS:-encode_vit_b encode_vit_h click amg quality} ${BENCH_ARGS:-} \
            --json "$out/bench_gpu.json" --markdown "$out/bench_gpu.md" ;;
    compile)
        step compile 420 $py -m anyseg bench --device cuda --compile --configs auto compiled \
            --tasks encode_vit_b encode_vit_h \
            --json "$out/bench_gpu_compile.json" --markdown "$out/bench_gpu_compile.md" ;;
    train)
        # ViT-B from scratch, every parameter trained, bf16 autocast, gradient checkpointing, 1024 px.
        run=${TMPDIR:-/tmp}/anyseg_gpu_train
        rm -rf "$run"
        step train ${TRAIN_LIMIT:-600} $py -m anyseg train --arch vit_b --mode full --device cuda --bf16 \
            --grad-checkpointing --data synthetic:count=2000,seed=0,size=1024,objects=2-6 \
            --steps ${TRAIN_STEPS:-300} --batch-size 4 --masks-per-image 8 --lr 2e-4 --warmup-steps 20 \
            --workers 12 --save-every 100 --quiet -o "$run" --export model.safetensors
        cp "$run/log.csv" "$out/train_log.csv"
        cp "$run/summary.json" "$out/train_summary.json" 2>/dev/null ;;
    *)
        echo "unknown part $part" >&2 ;;
    esac
done
