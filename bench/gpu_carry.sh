#!/usr/bin/env bash
# Prepares, here, what bench/gpu_suite.sh needs on a GPU machine that has no network and only the
# checkout (../shared does not travel), in two git-ignored folders to name in the device run's carry:
#   .whl/       DeepSpeed's wheels and the dependencies that machine lacks (../shared/gpu/make_carry.sh)
#   .gpu_data/  the MedPix-2.0 set (bench_data.py and the CUDA data tests read it) and the commit
# Then, with the device tool:  run  command="bash bench/gpu_suite.sh"  carry=[".whl", ".gpu_data"]
# Rerun it after each commit (only the commit file changes then; the rest is kept).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
shared="${UNIMLIP_SHARED:-../shared}"
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
  bash "$shared/gpu/make_carry.sh"
fi
if [ ! -f .gpu_data/medpix2/Descriptions.json ]; then
  mkdir -p .gpu_data
  cp -r "$shared/data/medpix2" .gpu_data/
fi
sha=$(git rev-parse --short HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || sha="$sha-dirty"
echo "$sha" > .gpu_data/commit
total=$(du -scm .whl .gpu_data $(git ls-files) 2>/dev/null | tail -1 | cut -f1)
echo "carry: .whl $(du -sh .whl | cut -f1), .gpu_data $(du -sh .gpu_data | cut -f1), commit $sha;" \
  "about $total MiB travel in all (the limit is 64)"
[ "$total" -lt 64 ] || { echo "over the device tool's 64 MiB limit" >&2; exit 1; }
