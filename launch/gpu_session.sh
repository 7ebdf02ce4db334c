#!/usr/bin/env bash
# What a one-GPU machine measures: the speed-ups' equivalence tests on the GPU, profiles of the fastest
# step (in memory, and fed by JPEGs decoded on the GPU), short training runs through the whole loop (data,
# evaluation, checkpoint) on the fast path, one of them on JPEGs decoded on the GPU, and the full benchmark.
# Each part fits a 10-minute command; run them in parts, most wanted first:
#   bash launch/gpu_session.sh OUT_DIR [PARTS]   (PARTS: any of tests,calibrate,profile,train,jpeg,bench; default
#   all; or calibrate-compiled alone: the layers in bf16, channels_last, compiled, and bench's step of them; or
#   predict alone: the cost model on the GPU in one command of a few minutes, below)
# With a quarter of an hour of a GPU, `predict` alone. With more, `calibrate,bench` first (every GPU figure,
# device-in-workers and Triton LRN included, the one-GPU step beside the cost model's on the GPU's own profile;
# BENCH_TIMEOUT below a command's limit), then `tests,jpeg` (the GPU equivalence and pixel tests, and the loop's
# speed with each device decoding), then `profile`. With a torch that predates TorchCodec's JPEG decoder, --decode-on device uses
# torchvision's.
set -uo pipefail
out=${1:-runs/gpu}
batch=${BATCH:-256}  # predict's global batch (a smaller one for a rehearsal on a CPU)
parts=${2:-tests,calibrate,profile,train,jpeg,bench}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$out/device.txt"
trace_tests() {  # $1: seconds allowed. The trace read off CUDA events nests and covers the step; calibrate on the GPU
    timeout "$1" python3 -m pytest -q -p no:cacheprovider tests/test_trace.py tests/test_predict.py -k "trace or gpu" \
        2>&1 | tee "$out/trace_tests.txt" | tail -5
}
if [[ $parts == *tests* ]]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider -p no:logging -k "gpu or nvjpeg or cuda" tests/test_speed.py \
        tests/test_data.py 2>&1 \
        | tee "$out/tests.txt" | tail -40
    trace_tests 180
fi
if [[ $parts == predict ]]; then  # the cost model on the GPU: its clock, its own profile, a traced comparison
    trace_tests 150
    echo "tests done at ${SECONDS} s"
    timeout 270 python3 -m alexnet_mp calibrate --ranks 1 --batch "$batch" --arch paper \
        --output "$out/hardware.json" 2>&1 | tail -5
    echo "calibrate done at ${SECONDS} s"
    # each one-GPU layout traced and compared with its prediction on that profile (comparison.md, timeline.png)
    [[ -f "$out/hardware.json" ]] && timeout 150 python3 -m alexnet_mp experiment --name predicted \
        --modes single,paper-split --ranks 1 --output-dir "$out" --hardware "$out/hardware.json" --steps 12 \
        --batch-size "$batch" --num-classes 1000 --init he --lr 0.001 --workers 4 --no-checkpoints 2>&1 | tail -12
    echo "experiment done at ${SECONDS} s"
    [[ -f "$out/hardware.json" ]] && python3 -m alexnet_mp plan --gpus 1,2,4,8 --batch "$batch" --hardware \
        "$out/hardware.json" --links h100-nvlink --output-dir "$out/plan" 2>&1 | tail -25
fi
if [[ $parts == *compiled* ]]; then  # the GPU's layers as bench's fastest step runs them: one compile a layer and size
    timeout 540 python3 -m alexnet_mp calibrate --ranks 1 --batch 256 --arch paper,owt --mixed-precision bf16 \
        --channels-last --compile --output "$out/hardware-compiled.json" 2>&1 | tail -5
    [[ -f "$out/hardware-compiled.json" ]] && timeout 300 python3 -m alexnet_mp bench --modes paper-split \
        --output-dir "$out/compiled-bench" --hardware "$out/hardware-compiled.json" 2>&1 | tail -25
    # the compiled step's own layer times planned on more GPUs, over NVLink's figures
    [[ -f "$out/hardware-compiled.json" ]] && python3 -m alexnet_mp plan --gpus 1,2,4,8 --batch 256 --hardware \
        "$out/hardware-compiled.json" --links h100-nvlink --output-dir "$out/plan-compiled" 2>&1 | tail -25
fi
if [[ $parts == *calibrate* && $parts != *compiled* ]]; then  # the GPU's own profile, which bench holds its step to
    timeout 240 python3 -m alexnet_mp calibrate --ranks "$(nvidia-smi -L | wc -l)" --batch 256 --arch paper,owt \
        --output "$out/hardware.json" 2>&1 | tail -5
    # the GPU's own layer times planned on more GPUs, over NVLink's figures
    [[ -f "$out/hardware.json" ]] && python3 -m alexnet_mp plan --gpus 1,2,4,8 --batch 256 --hardware \
        "$out/hardware.json" --links h100-nvlink --output-dir "$out/plan" 2>&1 | tail -25
fi
profile() {  # profile NAME [profile_step.py flags]: the fastest step, at batch 256
    local name=$1; shift
    timeout 150 python3 launch/profile_step.py --precision bf16 --channels-last --compile --batch 256 --rows 30 "$@" \
        2>&1 | tee "$out/profile_$name.txt" | tail -40 | cut -c1-80,150-
}
if [[ $parts == *profile* ]]; then
    # What no GPU has measured yet comes first, in case the call's time runs out: LRN's Triton kernels
    # (against the compiled torch ops of the in-memory profile, last), then the step fed by JPEGs decoded
    # on the GPU by the workers, then by the training process (the host's time, and a trace of where it
    # waits), then the step in memory (the device's time).
    profile triton_lrn --triton-lrn
    for fed in device-in-workers device memory; do
        profile $fed --fed-by $fed --trace "$out/trace_$fed.json.gz"
    done
fi
loop_speed() {  # loop_speed RUN_DIR BATCH: the loop's images/s in wall time (second half of its steps) vs the step's
    python3 -c "import json, statistics, sys
rows = [row for row in map(json.loads, open(sys.argv[1] + '/metrics.jsonl')) if 'loss' in row][-8:]
batch, seconds = int(sys.argv[2]), (rows[-1]['wall_s'] - rows[0]['wall_s']) / (len(rows) - 1)
step = statistics.median(row['step_time_s'] for row in rows[1:])
print(f'loop: {batch / seconds:.0f} images/s in wall time over steps {rows[1][\"step\"]}-{rows[-1][\"step\"]}; '
      f'its step alone: {batch / step:.0f}')" "$1" "$2"
}
if [[ $parts == *train* ]]; then
    timeout 180 python3 train.py --mode paper-split --steps 20 --batch-size 256 --synthetic-size 4096 \
        --num-classes 1000 --init he --lr 0.001 --mixed-precision bf16 --channels-last --compile \
        --workers 8 --output-dir "$out/train" 2>&1 | tail -5
    tail -n 3 "$out/train/metrics.jsonl"
    loop_speed "$out/train" 256
    rm -rf "$out/train/checkpoints"  # hundreds of MB, not worth fetching
fi
if [[ $parts == *jpeg* ]]; then  # the loop on JPEG files decoded by nvJPEG, CUDA graphs replaying the step
    python3 -c "import sys; from pathlib import Path; from alexnet_mp.bench import write_jpeg_tree
for split in ('train', 'val'): write_jpeg_tree(Path(sys.argv[1]) / split, 2048, classes=100)" "$out/jpegs"
    for place in device-in-workers device; do
        timeout 180 python3 train.py --mode single --data "$out/jpegs" --epochs 2 --batch-size 256 --lr 0.001 \
            --mixed-precision bf16 --channels-last --cuda-graphs --decode-on $place --workers 8 \
            --output-dir "$out/jpeg-$place" 2>&1 | tail -5
        grep -h val "$out/jpeg-$place/metrics.jsonl" | tail -n 2
        loop_speed "$out/jpeg-$place" 256
        rm -rf "$out/jpeg-$place/checkpoints"
    done
    rm -rf "$out/jpegs"
fi
if [[ $parts == *bench* ]]; then
    profile=()
    [[ -f "$out/hardware.json" ]] && profile=(--hardware "$out/hardware.json")
    timeout "${BENCH_TIMEOUT:-540}" python3 -m alexnet_mp bench --output-dir "$out" "${profile[@]}"  # bench.md
    rm -rf "$out"/bench-*  # the scratch folder (JPEGs) a bench cut short leaves behind
fi
