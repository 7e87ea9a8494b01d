#!/bin/bash
# Restore one large uint16 plane (zarr to zarr, the shipped grey model) inside a cgroup v1 memory
# limit, as a container or a SLURM job would impose, then without a limit as one whole plane, and
# compare the two outputs. Needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory.
#
#     bash benchmarks/cgroup_memory.sh [LIMIT_MB=2500] [SIDE=12288]
set -u
LIMIT_MB=${1:-2500}
SIDE=${2:-12288}
PY=${PYTHON:-python}
CG=/sys/fs/cgroup/memory/napari_gama_ir_benchmark
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; rmdir "$CG" 2>/dev/null' EXIT
mkdir -p "$CG" || exit 1
cd "$WORK"
SIDE=$SIDE $PY - <<'PY'
import os

import numpy as np
import zarr

side = int(os.environ["SIDE"])
plane = zarr.open_array("in.zarr", mode="w", shape=(side, side), chunks=(1024, 1024), dtype="uint16")
rng = np.random.default_rng(0)
rows, cols = np.mgrid[0:1024, 0:side]
for row in range(0, side, 1024):  # smooth structure and Poisson noise, band by band
    clean = 1000 + 800 * np.sin((rows + row) / 150.0) * np.cos(cols / 190.0)
    plane[row:row + 1024] = rng.poisson(clean[: min(1024, side - row)]).astype(np.uint16)
PY
echo $((LIMIT_MB * 1024 * 1024)) > "$CG/memory.limit_in_bytes"
echo 0 > "$CG/memory.max_usage_in_bytes"
echo "== $SIDE x $SIDE in a cgroup limited to $LIMIT_MB MiB"
bash -c "echo \$\$ > $CG/cgroup.procs; exec /usr/bin/time -f 'max RSS %M KiB, %e s' $PY -m napari_gama_ir.cli restore in.zarr -o limited.zarr --output-dtype input -q"
echo "exit $?; cgroup peak $(cat "$CG/memory.max_usage_in_bytes") bytes; $(grep oom_kill "$CG/memory.oom_control" | tr '\n' ' ')"
echo "== whole plane, no limit"
/usr/bin/time -f 'max RSS %M KiB, %e s' $PY -m napari_gama_ir.cli restore in.zarr -o whole.zarr --block 0 --output-dtype input -q
echo "exit $?"
$PY - <<'PY'
import numpy as np
import zarr

limited, whole = zarr.open_array("limited.zarr"), zarr.open_array("whole.zarr")
difference = np.abs(limited[:].astype(np.int64) - whole[:].astype(np.int64))
print(f"limited run's chunks {limited.chunks}; pixels that differ: {int((difference > 0).sum())}, most {difference.max()}")
PY
