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
# The device takes at most 64 MiB of working tree: as many training images as fit beside the files
# that travel (tracked, and untracked but not ignored) and the wheels, with 2 MiB to spare (all 432
# did not fit on 2026-11-27).
room=$(( 64 * 1024 * 1024 - 2 * 1024 * 1024 - $(git ls-files -z --cached --others --exclude-standard | xargs -0 cat | wc -c) - $(cat .whl/* | wc -c) ))
rm -rf .gpudata && mkdir -p .gpudata/CBSD432
for image in ../shared/data/train/CBSD432/*; do
    size=$(stat -c %s "$image")
    [ "$size" -le "$room" ] || break
    cp "$image" .gpudata/CBSD432/ && room=$((room - size))
done
echo "$(ls .gpudata/CBSD432 | wc -l) training images"
du -sh .whl .gpudata
