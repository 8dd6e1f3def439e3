#!/usr/bin/env bash
# The one prepared GPU check: everything GPU-side in a single run of < 8 minutes (the steps' timeouts sum to 475 s).
#   1. the GPU-only tests (fused kernels with true bf16 dots, CUDA decode paths),
#   2. bench_losses.py (fused contrastive terms and DropBlock against the references; time-boxed to 30 s),
#   3. bench_data.py (CPU loader vs torch-GPU path vs DALI where installed, and the train step; 3 s per path),
#   4. bench_step.py (the full phase-2 step, reference vs the trainer's fast path through DeepSpeed, at the
#      paper's model and per-GPU batch 96, then larger batches until one does not fit; time-boxed to 90 s),
#   4b. the planner's estimate (`unimlip-fast plan`) at bench_step's batch 96, beside bench_step's measured peak,
#   5. two short pretraining runs through the CLI (bf16 by autocast with the batch in 4 accumulated
#      micro-batches, then DeepSpeed's bf16 mode) with the fast step as CUDA gets it (train.fast=auto:
#      channels-last, SDPA, fused AdamW; torch.compile off here, to fit), Triton kernels and the torch GPU
#      data path,
#   6. bench_accum.py (the paper's model at global batch 768 on this GPU, whole and in micro-batches of
#      96; the largest global batch micro-batches of 96 reach, within its budget).
# The GPU machine has no network and gets only the checkout: first run `bash bench/gpu_carry.sh`
# here, which puts DeepSpeed's wheels in .whl/ and the MedPix data and commit in .gpu_data/, then
# run this there with both folders carried. Copy what it prints, with the card's name, into
# bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ -z "${UNIMLIP_SHARED_DATA:-}" ] && [ -d .gpu_data ]; then export UNIMLIP_SHARED_DATA="$PWD/.gpu_data"; fi
if ! git rev-parse HEAD >/dev/null 2>&1 && [ -f .gpu_data/commit ]; then export UNIMLIP_COMMIT="$(cat .gpu_data/commit)"; fi
out="${OUT:-bench/out}"; mkdir -p "$out"
exec > >(tee "$out/suite.log") 2>&1  # the whole log comes back with the CSVs
medpix="${UNIMLIP_SHARED_DATA:-../shared/data}/medpix2"
[ -d "$medpix" ] && echo "MedPix: $medpix" || echo "MedPix MISSING at $medpix: bench_data and the CUDA data tests cannot run"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
echo "commit ${UNIMLIP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
status=0
step() { echo; echo "=== $1"; shift; "$@" || { echo "FAILED ($?): $*"; status=1; }; }
step "GPU tests" timeout 65 python3 -m pytest -q -p no:cacheprovider -rs -k "cuda or gpu" \
  tests/test_kernels_contrastive.py tests/test_kernels_dropblock.py tests/test_kernels_ops.py tests/test_masking.py \
  tests/test_views.py tests/test_shards.py tests/test_dali.py tests/test_accumulate.py
step "bench_losses" timeout 50 python3 bench/bench_losses.py --csv "$out/losses.csv" --budget 30
step "bench_data" timeout 45 python3 bench/bench_data.py --csv "$out/data.csv" --seconds 3
step "bench_step" timeout 115 python3 bench/bench_step.py --csv "$out/step.csv" --batches 96,max --warmup 2 \
  --repeats 5 --budget 90
# The planner's estimate for bench_step's fast path at batch 96 (its model: a 12 x 768 random-bert text tower with
# an 8192-token vocabulary, DeepSpeed ZeRO-2 bf16, one GPU) beside what bench_step measured there.
step "plan vs bench_step at batch 96" timeout 45 bash -c "python3 -m unimlip_fast.cli plan configs/paper.yaml \
  --ds-config configs/zero2_bf16.json --gpu h100-80gb --gpus 1 --json train.batch_size=96 model.text.encoder=random-bert \
  model.text.vocab_size=8192 model.text.hidden_size=768 model.text.num_layers=12 model.text.num_heads=12 \
  > '$out/plan96.json' && python3 - '$out/plan96.json' '$out/step.csv' <<'PY'
import csv, json, sys
plan = json.load(open(sys.argv[1]))
print(f\"planner (predicted), fast path at micro-batch 96: {plan['total_gib']['simclr']:.2f} GiB \"
      f\"(model states {plan['model_states_gib']['total']:.2f}, activations {plan['activations_gib']['simclr']:.2f})\")
try:
    rows = [r for r in csv.DictReader(open(sys.argv[2])) if r['path'] == 'fast' and r['batch'] == '96' and r['peak_gib']]
    print('bench_step measured peak, fast path at batch 96:', ', '.join(f\"{r['feed']} {r['peak_gib']} GiB\" for r in rows) or 'no row')
except FileNotFoundError:
    print('bench_step wrote no step.csv')
PY"
for ds in zero2 zero2_bf16; do  # bf16 by torch_autocast (the batch of 64 as 4 x 16), then DeepSpeed's bf16 mode
  micro=$([ "$ds" = zero2 ] && echo 16 || echo 0)
  step "pretrain smoke, $ds (fast step, triton kernels, torch GPU data path, micro-batch ${micro/#0/whole})" timeout 50 \
    python3 -m unimlip_fast.cli pretrain configs/demo.yaml --ds-config "configs/$ds.json" --run-dir "/tmp/unimlip_gpu_$ds" \
    --overwrite train.max_steps=20 train.micro_batch_size="$micro" model.kernels=triton data.backend=torch data.num_workers=4 \
    train.compile=false  # compiling both phases would not fit the time box: bench_step measures the compiled step
  cp "/tmp/unimlip_gpu_$ds/metrics.jsonl" "$out/metrics_$ds.jsonl" 2>/dev/null
done
step "bench_accum" timeout 55 python3 bench/bench_accum.py --gpu --csv "$out/accum.csv" --budget 30
exit $status
