#!/usr/bin/env bash
# The GPU work of one device call (device tool); name the parts to run, in this order by default:
#   smoke    the package imports, a GAMA-IR-S training step runs in bf16 on cuda, and the engine's
#            cuda restore (queued pinned batches, CUDA graphs) matches the cpu one (fails fast);
#   smoke-compiled  the same check through torch.compile with CUDA graphs, any fallback to eager an
#            error (compiles a few shapes: minutes; not in the default list);
#   oom      the engine's retry with smaller tiles on a real out-of-memory error: a per-process memory
#            limit between one pass's peak at tile 2048 and at 1024 (GAMA-IR-S, grey), eager and with
#            CUDA graphs; the result must match a restore at the tile it ended with (not in the default list);
#   photos   restore() called once per 512 x 512 RGB photo (GAMA-IR-S colour, CUDA graphs, the default):
#            the kept runner against a new one each call (forget_kept_runner), which captured its
#            graphs again per photo (not in the default list);
#   layout   benchmarks/gpu_layout.py: LayerNorm kernels x memory layout x precision, a profile;
#   latency  the paper's protocol at 256-2048, fp32 and bf16, every model (docs/performance.md);
#   engine   restore a 64 x 2048 x 2048 uint16 zarr stack against the bare network (bf16), with its
#            timeline (device busy share, startup), then with the network replaced by a copy;
#   graphs   latency at 256 and 512 (fp32, bf16) and the engine with CUDA graphs (--cuda-graphs);
#   kernels  GPU kernels per pass of GAMA-IR-S and NAFNet-32 at 256, eager and with CUDA graphs (the
#            profiler runs in its own processes, so it cannot slow the timed runs of other parts);
#   compiled latency of GAMA-IR-S and NAFNet-32 through torch.compile at 256 and 512, fp32 (compile
#            time in the warm-up: a few minutes; not in the default list);
#   compiled-graphs  the same through torch.compile with CUDA graphs, at each precision
#            of LATENCY_PRECISIONS (not in the default list);
#   upsample the decoders' up-sampling as 1x1 conv + pixel shuffle (what a GPU runs) against one
#            transposed convolution (what the CPU runs): eager bf16 at 256 and 512 for GAMA-IR-S and
#            NAFNet-32, alternating, twice; then GAMA-IR-S at 256 through torch.compile with CUDA
#            graphs (two compilations; not in the default list);
#   engine-compiled  the engine part's stack through torch.compile with CUDA graphs (bf16;
#            a compilation per tile batch shape, in the child and in the bare timing; not in the default list);
#   small-planes  stacks of 32-512 px planes restored a chunk at a time (the engine) against the bare
#            network a plane a pass (benchmarks/small_planes.py, GAMA-IR-XS fp32; not in the default list);
#   compiled-shapes  compiled restores whose last pass is shorter (small planes in uneven chunks, tile
#            counts the batch does not divide), each in a fresh process with an empty inductor cache
#            (benchmarks/compiled_shapes.py; several compilations: minutes; not in the default list);
#   blocks   an 8192 x 8192 plane restored whole, in blocks of 2048 sharing their edge tiles, and in
#            blocks not sharing them (GAMA-IR-S grey, CUDA graphs), then napari's preview of a full-HD
#            view of it (benchmarks/preview_region.py; not in the default list);
#   distributed  restore and training throughput on a one-GPU dask cluster (not in the default list);
#   train    GAMA-IR-S colour denoiser for issue 5 until the deadline (benchmarks/train_for.py),
#            with the grey one (fine-tuned from the shipped colour one) beside it when GPU_TRAIN_GREY=1,
#            or the grey one alone with GPU_TRAIN_RGB=0; exported as float16 checkpoints. Both ship
#            already (colour: 7 H200 minutes; grey: 83 CPU minutes): a run here would train them longer.
# First run benchmarks/gpu_prepare.sh here (wheels and training images), then, on the device,
# carrying .whl and .gpudata, from the repository root with $OUT set:
#   GPU_CHECK_SECONDS=560 bash benchmarks/gpu_check.sh smoke latency engine train
# GPU_CHECK_SECONDS bounds the whole call; training takes what the other parts leave.
# LATENCY_PRECISIONS (default "fp32 bf16") and LATENCY_SIZES (default "256 512 1024 2048") shorten
# the latency part, e.g. to check one change before training.
# Measured on an H100 (2026-11-26): smoke 34 s, latency 80-90 s per precision, engine 80 s.
set -uo pipefail
START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-560}
OUT=${OUT:-benchmarks/output/gpu}
R="$OUT/results"
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(smoke layout latency engine train)
mkdir -p "$R" /tmp/train
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
log() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$R/log.txt"; }
wanted() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$R/gpu.txt"

if wanted smoke; then
    log "smoke"
    python3 - <<'EOF' 2>&1 | tee -a "$R/log.txt" || exit 1
import dask, torch, zarr
from napari_gama_ir import create_model
from napari_gama_ir.train import Trainer, TrainSettings, data_from_paths
print("torch", torch.__version__, torch.cuda.get_device_name(), "dask", dask.__version__, "zarr", zarr.__version__)
data = data_from_paths(None, ".gpudata/CBSD432")
settings = TrainSettings(steps=2, batch=4, patch=64, noise="gaussian:0-55", precision="bf16", device="cuda",
                         validation_fraction=0.05)
events = list(Trainer(create_model("gama_ir_s"), data, settings, "/tmp/smoke").run())
print("smoke: 2 steps, loss", events[-1].loss, "validation", events[-1].validation)
# The engine's queued, pinned CUDA path (and CUDA graphs) against the CPU path, 5 x 5 tiles per plane.
import numpy as np
from napari_gama_ir import restore
torch.backends.cudnn.allow_tf32 = False  # compare the engine's logic, not TF32 rounding
stack = np.random.default_rng(0).random((3, 1100, 1100), dtype=np.float32)
model = create_model("gama_ir_xs-denoise-grey", pretrained=True)
cpu = np.asarray(restore(stack, model, "ZYX", tile=256, device="cpu"))
for graphs in (False, True):
    cuda = np.asarray(restore(stack, model, "ZYX", tile=256, device="cuda", batch=4, cuda_graphs=graphs))
    error = float(np.abs(cuda - cpu).max())
    print(f"smoke: engine on cuda (CUDA graphs {graphs}) against cpu, largest difference {error:.2e}")
    assert error < 1e-3, error
EOF
fi

if wanted smoke-compiled; then
    log "smoke-compiled"
    # The engine runs its network from worker threads, where inductor's own CUDA graphs failed before
    # pytorch/pytorch#123177 was fixed; the compiled path now captures its graphs itself.
    timeout 300 python3 - <<'EOF' 2>&1 | tee -a "$R/log.txt" || exit 1
import warnings
import numpy as np, torch
from napari_gama_ir import create_model, restore
warnings.filterwarnings("error", message=".*running the network eagerly")
torch.backends.cudnn.allow_tf32 = False
stack = np.random.default_rng(0).random((3, 1100, 1100), dtype=np.float32)
model = create_model("gama_ir_xs-denoise-grey", pretrained=True)
cpu = np.asarray(restore(stack, model, "ZYX", tile=256, device="cpu"))
cuda = np.asarray(restore(stack, model, "ZYX", tile=256, device="cuda", batch=4, compile=True, cuda_graphs=True))
error = float(np.abs(cuda - cpu).max())
print(f"smoke-compiled: engine on cuda (compiled, CUDA graphs) against cpu, largest difference {error:.2e}")
assert error < 1e-3, error
EOF
fi

if wanted oom; then
    log "oom"
    timeout 150 python3 - <<'EOF' 2>&1 | tee -a "$R/log.txt"
import gc, re, time, warnings
import numpy as np, torch
from napari_gama_ir import create_model, restore
torch.backends.cudnn.allow_tf32 = False
model = create_model("gama_ir_s-denoise-grey", pretrained=True)
stack = np.random.default_rng(0).random((2, 2048, 2048), dtype=np.float32)
total = torch.cuda.get_device_properties(0).total_memory

def release():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()

def peak(side):  # memory reserved by one plane's restore at tile ``side``, eager
    release()
    torch.cuda.reset_peak_memory_stats()
    restore(stack[:1], model, "ZYX", tile=side, overlap=64, device="cuda", cuda_graphs=False)
    return torch.cuda.max_memory_reserved()

big, small = peak(2048), peak(1024)
print(f"oom: peak reserved, one plane: tile 2048 {big / 1e9:.2f} GB, tile 1024 {small / 1e9:.2f} GB")
for graphs in (False, True):
    release()
    torch.cuda.set_per_process_memory_fraction((big + small) / 2 / total)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = restore(stack, model, "ZYX", tile=2048, overlap=64, device="cuda", cuda_graphs=graphs)
        except Exception as error:
            result = None
            print(f"oom: CUDA graphs {graphs}: failed: {type(error).__name__}: {str(error)[:300]}")
    took = time.perf_counter() - start
    for warning in caught:
        print(f"oom: CUDA graphs {graphs}: warning: {str(warning.message)[:200]}")
    release()
    torch.cuda.set_per_process_memory_fraction(1.0)
    sides = [int(side) for w in caught for side in re.findall(r"retrying with tiles of (\d+)", str(w.message))]
    if result is None or not sides:
        print(f"oom: CUDA graphs {graphs}: FAILED (no result, or no tile halved)")
        continue
    start = time.perf_counter()
    reference = restore(stack, model, "ZYX", tile=sides[-1], overlap=64, device="cuda", cuda_graphs=graphs)
    direct = time.perf_counter() - start
    error = float(np.abs(result - reference).max())
    print(f"oom: CUDA graphs {graphs}: tiles halved to {sides}; {took:.2f} s, against {direct:.2f} s at that tile "
          f"from the start; largest difference {error:.2e} {'ok' if error < 1e-3 else 'FAILED'}")
EOF
fi

if wanted photos; then
    log "photos"
    timeout 120 python3 - <<'EOF' 2>&1 | tee -a "$R/log.txt"
import time
import numpy as np, torch
from napari_gama_ir import create_model, restore
from napari_gama_ir.engine.runner import forget_kept_runner
model = create_model("gama_ir_s-denoise-rgb", pretrained=True)
photos = np.random.default_rng(0).integers(0, 256, (20, 512, 512, 3), dtype=np.uint8)
for kept in (True, False, True, False):
    restore(photos[0], model, "YXC", device="cuda")  # the first call builds (and captures) in both
    seconds = []
    for photo in photos:
        if not kept:
            forget_kept_runner()
        start = time.perf_counter()
        restore(photo, model, "YXC", device="cuda")
        seconds.append(time.perf_counter() - start)
    print(f"photos: runner kept {kept}: median {np.median(seconds) * 1e3:.1f} ms a photo, "
          f"{sum(seconds):.2f} s for {len(photos)}")
EOF
fi

if wanted blocks; then
    log "blocks"
    timeout 150 python3 - <<'EOF' 2>&1 | tee -a "$R/log.txt"
import importlib, time
import numpy as np, torch
from napari_gama_ir import create_model, restore
engine = importlib.import_module("napari_gama_ir.engine.restore")  # the module, not the function
torch.backends.cudnn.allow_tf32 = False
model = create_model("gama_ir_s-denoise-grey", pretrained=True)
plane = np.random.default_rng(0).integers(0, 4000, (8192, 8192), dtype=np.uint16)
restore(plane[:2048, :2048], model, "YX", device="cuda")  # warm-up: the graphs are captured

def timed(block):
    start = time.perf_counter()
    result = restore(plane, model, "YX", device="cuda", block=block)
    return result, time.perf_counter() - start

whole, whole_seconds = timed(0)
shared, shared_seconds = timed(2048)
engine.SHARED_TILE_BYTES = 0
apart, apart_seconds = timed(2048)
print(f"blocks: 8192 x 8192, GAMA-IR-S grey, CUDA graphs: whole {whole_seconds:.2f} s; blocks of 2048 sharing "
      f"tiles {shared_seconds:.2f} s, not sharing {apart_seconds:.2f} s; largest difference from whole "
      f"{np.abs(shared - whole).max():.2e}, {np.abs(apart - whole).max():.2e}")
EOF
    timeout 120 python3 benchmarks/preview_region.py --model gama_ir_s-denoise-grey --size 8192 --device cuda \
        --skip-whole --out "$R/preview_region.json" 2>&1 | tail -8 | tee -a "$R/log.txt"
fi

if wanted layout; then
    log "layout"
    timeout 150 python3 benchmarks/gpu_layout.py --size 512 --json "$R/gpu_layout.json" \
        --deadline $(($(date +%s) + 120)) 2>&1 | grep -v -i warn | tee -a "$R/log.txt"
fi

if wanted latency; then
    for precision in ${LATENCY_PRECISIONS:-fp32 bf16}; do
        log "latency $precision"
        # shellcheck disable=SC2086  # the sizes are words
        timeout 120 python3 benchmarks/latency.py --device cuda --precision "$precision" \
            --sizes ${LATENCY_SIZES:-256 512 1024 2048} \
            --budget 2 --out "$R/latency_$precision" 2>&1 | tail -14 | tee -a "$R/log.txt"
    done
fi

if wanted engine; then
    log "engine"
    timeout 120 python3 benchmarks/engine_throughput.py --planes 64 --size 2048 --arch gama_ir_s --bare-planes 8 \
        --device cuda --precision bf16 --workdir /tmp/engine-bench --keep --json "$R/engine_gama_ir_s_bf16.json" 2>&1 \
        | sed -n '/^stack /,$p' | tee -a "$R/log.txt"
    log "engine, network copied (the host side alone, with the threads used beside a GPU)"
    timeout 60 python3 benchmarks/engine_throughput.py --planes 64 --size 2048 --arch gama_ir_s --bare-planes 2 \
        --device cuda --precision bf16 --network copy --workdir /tmp/engine-bench --keep \
        --json "$R/engine_host_side.json" 2>&1 | sed -n '/^stack /,$p' | tee -a "$R/log.txt"
fi

if wanted graphs; then
    for precision in fp32 bf16; do
        log "latency $precision, CUDA graphs"
        timeout 120 python3 benchmarks/latency.py --device cuda --precision "$precision" --sizes 256 512 --cuda-graphs \
            --budget 2 --out "$R/latency_${precision}_graphs" 2>&1 | tail -14 | tee -a "$R/log.txt"
    done
    log "engine, CUDA graphs"
    timeout 120 python3 benchmarks/engine_throughput.py --planes 64 --size 2048 --arch gama_ir_s --bare-planes 8 \
        --device cuda --precision bf16 --path cuda-graphs --workdir /tmp/engine-bench \
        --json "$R/engine_gama_ir_s_bf16_graphs.json" 2>&1 | sed -n '/^stack /,$p' | tee -a "$R/log.txt"
fi

if wanted kernels; then
    for graphs in "" --cuda-graphs; do
        log "kernels per pass $graphs"
        # shellcheck disable=SC2086  # an empty option is no word
        timeout 90 python3 benchmarks/latency.py --device cuda --sizes 256 --models gama_ir_s nafnet_32 $graphs \
            --warmup 5 --runs 20 --count-kernels --out "$R/kernels${graphs:+_graphs}" 2>&1 | tail -4 | tee -a "$R/log.txt"
    done
fi

if wanted compiled; then
    log "latency fp32, torch.compile"
    timeout 300 python3 benchmarks/latency.py --device cuda --sizes 256 512 --models gama_ir_s nafnet_32 --compile \
        --budget 2 --out "$R/latency_fp32_compiled" 2>&1 | tail -6 | tee -a "$R/log.txt"
fi

if wanted compiled-graphs; then
    for precision in ${LATENCY_PRECISIONS:-fp32 bf16}; do
        log "latency $precision, torch.compile with CUDA graphs"
        timeout 300 python3 benchmarks/latency.py --device cuda --precision "$precision" --sizes 256 512 \
            --models gama_ir_s nafnet_32 --compile --cuda-graphs --budget 2 \
            --out "$R/latency_${precision}_compiled_graphs" 2>&1 | tail -6 | tee -a "$R/log.txt"
    done
fi

if wanted upsample; then
    for round in 1 2; do
        for variant in shuffle transposed; do
            log "up-sampling: $variant, eager bf16, round $round"
            timeout 90 python3 benchmarks/latency.py --device cuda --precision bf16 --sizes 256 512 \
                --models gama_ir_s nafnet_32 --upsample "$variant" --budget 2 \
                --out "$R/upsample_${variant}_bf16_$round" 2>&1 | tail -4 | tee -a "$R/log.txt"
        done
    done
    for variant in shuffle transposed; do
        log "up-sampling: $variant, GAMA-IR-S bf16, torch.compile with CUDA graphs"
        timeout 150 python3 benchmarks/latency.py --device cuda --precision bf16 --sizes 256 --models gama_ir_s \
            --compile --cuda-graphs --upsample "$variant" --budget 2 \
            --out "$R/upsample_${variant}_bf16_compiled_graphs" 2>&1 | tail -1 | tee -a "$R/log.txt"
    done
fi

if wanted engine-compiled; then
    log "engine, torch.compile with CUDA graphs"
    timeout 300 python3 benchmarks/engine_throughput.py --planes 64 --size 2048 --arch gama_ir_s --bare-planes 8 \
        --device cuda --precision bf16 --path compiled-graphs --workdir /tmp/engine-bench --keep \
        --json "$R/engine_gama_ir_s_bf16_compiled_graphs.json" 2>&1 | sed -n '/^stack /,$p' | tee -a "$R/log.txt"
fi

if wanted small-planes; then
    log "small planes, a chunk at a time"
    timeout 240 python3 benchmarks/small_planes.py --device cuda --sides 32 64 128 256 512 \
        --json "$R/small_planes_cuda.json" 2>&1 | tail -6 | tee -a "$R/log.txt"
fi

if wanted compiled-shapes; then
    log "compiled restores with a shorter last pass"
    timeout 400 python3 benchmarks/compiled_shapes.py --device cuda --json "$R/compiled_shapes_cuda.json" 2>&1 \
        | tail -4 | tee -a "$R/log.txt"
fi

if wanted distributed; then
    log "distributed"
    timeout 90 python3 benchmarks/distributed_scaling.py --planes 16 --size 2048 --arch gama_ir_s --layouts 1x4 \
        --device cuda --json "$R/distributed_scaling_cuda.json" 2>&1 | tail -6 | tee -a "$R/log.txt"
    timeout 90 python3 benchmarks/distributed_training.py --arch gama_ir_s --steps 200 --batch 16 --patch 128 \
        --layouts 1x4 --device cuda --json "$R/distributed_training_cuda.json" 2>&1 | tail -6 | tee -a "$R/log.txt"
fi

if wanted train; then
    UNTIL=$((START + TOTAL - 30))
    log "training until $((UNTIL - START)) s"
    common=(--until "$UNTIL" --clean .gpudata/CBSD432 --patch 128 --batch 32 --precision bf16
            --device cuda --seed 0 --checkpoint-every 500)
    if [ "${GPU_TRAIN_RGB:-1}" = 1 ]; then
        python3 benchmarks/train_for.py "${common[@]}" --arch gama_ir_s --noise gaussian:0-55 -o /tmp/train/rgb \
            >"$R/train_rgb.log" 2>&1 &
    fi
    if [ "${GPU_TRAIN_GREY:-0}" = 1 ]; then  # fine-tuned from the colour model, as the shipped one was on a CPU
        python3 benchmarks/train_for.py "${common[@]}" --from gama_ir_s-denoise-rgb --lr 5e-4 --grey --noise mixed \
            --normalization percentile-image -o /tmp/train/grey >"$R/train_grey.log" 2>&1 &
    fi
    wait
    for f in "$R"/train_*.log; do tail -n 3 "$f"; done | tee -a "$R/log.txt"
    log "export"
    python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$R/log.txt"
import shutil, sys
from pathlib import Path
from napari_gama_ir.model import load_checkpoint, save_checkpoint
out = Path(sys.argv[1])
for task in ("rgb", "grey"):
    run = Path("/tmp/train") / task
    if (run / "model.json").is_file():
        save_checkpoint(load_checkpoint(run / "model.json"), out / f"gama_ir_s-denoise-{task}", half=True)
        shutil.copy(run / "checkpoint" / "training.json", out / "results" / f"checkpoint_{task}.json")
        print("exported", task)
EOF
fi
log "done"
tar czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$R"
