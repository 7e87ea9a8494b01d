#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md and docs/distributed.md in one call, for a session
# that is lent a GPU machine (device tool): run from the repository root with $OUT set, e.g.
#   bash benchmarks/gpu_check.sh            (about 11 minutes on an H100, estimated)
# It installs the project (torch from the machine), then writes JSON/PNG/logs into $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/output/gpu}
mkdir -p "$OUT"
python3 -m pip install -q -e ".[distributed]" matplotlib 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1
for precision in fp32 bf16 fp16; do
    timeout 120 python3 benchmarks/latency.py --device cuda --precision "$precision" --sizes 256 512 1024 2048 \
        --budget 10 --out "$OUT/latency_$precision" 2>&1 | tail -12 | tee -a "$OUT/log.txt"
done
timeout 150 python3 benchmarks/latency.py --device cuda --precision bf16 --compile --sizes 256 1024 \
    --models gama_ir_s gama_ir_l nafnet_32 --budget 10 --out "$OUT/latency_bf16_compiled" 2>&1 | tail -6 | tee -a "$OUT/log.txt"
timeout 120 python3 benchmarks/engine_throughput.py --planes 64 --size 2048 --arch gama_ir_s --bare-planes 8 \
    --device cuda --workdir /tmp/engine-bench --json "$OUT/engine_gama_ir_s.json" 2>&1 | tail -3 | tee -a "$OUT/log.txt"
# Per-GPU throughput on a cluster of one worker per GPU (one GPU here: one worker), restore and training.
timeout 90 python3 benchmarks/distributed_scaling.py --planes 16 --size 2048 --arch gama_ir_s --layouts 1x4 \
    --device cuda --json "$OUT/distributed_scaling_cuda.json" 2>&1 | tail -6 | tee -a "$OUT/log.txt"
timeout 90 python3 benchmarks/distributed_training.py --arch gama_ir_s --steps 200 --batch 16 --patch 128 \
    --layouts 1x4 --device cuda --json "$OUT/distributed_training_cuda.json" 2>&1 | tail -6 | tee -a "$OUT/log.txt"
