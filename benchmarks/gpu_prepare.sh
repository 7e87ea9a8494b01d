#!/usr/bin/env bash
# Run here, before a device call: what benchmarks/gpu_check.sh needs and the GPU machine lacks.
# It has no network and no dask or zarr, so their wheels (Python 3.12, x86-64) go to .whl/; the
# training images are copied to .gpudata/ for the trip (the device copies only the repository).
# Both folders are git-ignored through .git/info/exclude; delete .gpudata/ after the call.
#   bash benchmarks/gpu_prepare.sh            then: device run, carry [".whl", ".gpudata"]
set -euo pipefail
cd "$(dirname "$0")/.."
for folder in /.whl/ /.gpudata/; do
    grep -qx "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >>.git/info/exclude
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    dask==2026.8.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 partd==1.4.2 locket==1.0.0 google-crc32c==1.9.0
mkdir -p .gpudata
cp -r ../shared/data/train/CBSD432 .gpudata/
du -sh .whl .gpudata
