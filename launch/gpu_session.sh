#!/usr/bin/env bash
# Everything a lent GPU machine is used for, in one call (its time is short): the speed-ups'
# equivalence tests on the GPU, a profile of the fastest step, a short training run through the whole
# loop (data, evaluation, checkpoint) on the fast path, and the full benchmark.
#   bash launch/gpu_session.sh OUT_DIR [PARTS]   (PARTS: any of tests,profile,train,bench; default all)
# The lent machine reaches no package index: for --decode-on device, carry a TorchCodec wheel for its
# Python in wheels/ (pip download torchcodec --no-deps --python-version 3.12 --only-binary=:all: -d wheels).
set -uo pipefail
out=${1:-runs/gpu}
parts=${2:-tests,profile,train,bench}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$out/device.txt"
if ! python3 -c "import torchcodec.decoders" 2>/dev/null && compgen -G "wheels/torchcodec-*.whl" >/dev/null; then
    python3 -m pip install -q --no-deps --no-index wheels/torchcodec-*.whl 2>&1 | tail -2
fi
if [[ $parts == *tests* ]]; then
    timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:logging -k "gpu or nvjpeg" tests/test_speed.py \
        tests/test_data.py 2>&1 \
        | tee "$out/tests.txt" | tail -40
fi
if [[ $parts == *profile* ]]; then
    timeout 150 python3 launch/profile_step.py --precision bf16 --channels-last --compile --batch 256 --rows 30 \
        2>&1 | tee "$out/profile.txt" | tail -40 | cut -c1-80,150-
fi
if [[ $parts == *train* ]]; then
    timeout 240 python3 train.py --mode paper-split --steps 20 --batch-size 256 --synthetic-size 4096 \
        --num-classes 1000 --init he --lr 0.001 --mixed-precision bf16 --channels-last --compile \
        --workers 8 --output-dir "$out/train" 2>&1 | tail -5
    tail -n 3 "$out/train/metrics.jsonl"
    rm -rf "$out/train/checkpoints"  # hundreds of MB, not worth fetching
fi
if [[ $parts == *bench* ]]; then
    timeout "${BENCH_TIMEOUT:-540}" python3 -m alexnet_mp bench --output-dir "$out"
fi
