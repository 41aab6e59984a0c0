#!/usr/bin/env bash
# GPU check of the speed work: benchmarks/throughput.py on CUDA with CLIP ViT-B/16 (random weights),
# eager and torch.compile'd, on one H100/H200, in about 4-5 minutes. Its runs and figures are in
# benchmarks/results/h200-2026-11-28/.
#
# The device machine has torch, torchvision, Lightning, pandas, timm, huggingface_hub and the rest of
# the scientific stack (see /work/.library/device/KINDS.md) but no network and none of open_clip,
# wilds, Hydra or Optuna. So, in two steps:
#
#   benchmarks/gpu_check.sh fetch   # here, with network and the project's .venv: the missing wheels
#                                   # (same versions as .venv) into .whl/, which git ignores locally
#   benchmarks/gpu_check.sh run     # there (device tool: carry [".whl"], command
#                                   # "bash benchmarks/gpu_check.sh run", timeout_s 560): installs the
#                                   # wheels offline into /tmp/site, runs, writes to $OUT (or ./gpu_check_out)
#   benchmarks/gpu_check.sh trials  # there too (timeout_s 300): the trial breakdown alone, twice: the
#                                   # embedded world's default search (batch 128, 50 steps, 2000 OOD images
#                                   # validated every 25 steps) and the paper's iWildCam trial shape on the same
#                                   # world (batch 256, 100 steps, 1000 OOD images), then the embedded search
#                                   # validated once (eval_every 50), about 4 minutes
#
# Time on an H200 (2026-11-28): 224-230 s in all. That is the install and the CUDA tests (about 20 s),
# then the eager run (about 100 s: steps, three trials of the embedded search with the world generated
# there, the data path), then the compiled steps (about 75 s, most of it compiling). Compiling the
# norm-gradient function for two parameter lists added about 100 s in one run (312 s, steps only);
# that was with dynamic shapes, which it no longer uses. The eager run now also compiles that function
# once, for its "norm gradients compiled" row (model.compile_norm_grads): not yet timed on a GPU. Each run
# has its own timeout (60 s, 260 s, 240 s), so the device tool's timeout_s is 560.
set -euo pipefail
cd "$(dirname "$0")/.."

# Not outdated (a wilds dependency): with it, importing wilds starts a non-daemon thread that asks PyPI
# for the latest version, which a machine without network can wait on; without it wilds skips the check.
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 wilds==2.0.0 pytz==2026.6
        hydra-core==1.3.8 omegaconf==2.3.1 optuna==5.0.0 alembic==1.20.1 Mako==1.4.3
        SQLAlchemy==2.1.9 colorlog==6.12.0)

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    .venv/bin/python -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist only: built here
    ls .whl
    ;;
run|trials)
    OUT="${OUT:-$PWD/gpu_check_out}"
    mkdir -p "$OUT"
    log="$OUT/run.log"  # one log: the device tool brings back 8 files at most
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 AUTOFT_CACHE=/tmp/autoft-cache WANDB_MODE=disabled
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$log"
    python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$log"
    if [ "$1" = trials ]; then
        # wandb is not on that machine: the trials' W&B runs fail in their background thread, off the trial's path
        trials="--device cuda --model vit_b16 --sections trial"
        # shellcheck disable=SC2086
        timeout 120 python3 benchmarks/throughput.py $trials --trials 6 --out "$OUT/embedded" 2>&1 | tee -a "$log" \
            || echo "embedded trials failed or timed out" | tee -a "$log"
        # shellcheck disable=SC2086
        timeout 150 python3 benchmarks/throughput.py $trials --trials 4 --out "$OUT/paper_shape" \
            --trial-override search.inner_steps=100 --trial-override dataset.batch_size=256 \
            --trial-override dataset.ood_val_size=1000 2>&1 | tee -a "$log" \
            || echo "paper-shape trials failed or timed out" | tee -a "$log"
        # the embedded search validated once, at its end (what its trials cost without the step-25 report)
        # shellcheck disable=SC2086
        timeout 90 python3 benchmarks/throughput.py $trials --trials 4 --out "$OUT/embedded_one_val" \
            --trial-override search.eval_every=50 2>&1 | tee -a "$log" \
            || echo "one-validation trials failed or timed out" | tee -a "$log"
        exit 0
    fi
    # the fused foreach norm gradients on CUDA against autograd (skipped where there is no GPU, as in CI)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_objective.py -k cuda 2>&1 | tee -a "$log" \
        || echo "CUDA test failed or timed out" | tee -a "$log"
    # eager: steps, trials on the embedded world's default search (generated here, ~10 s), data path;
    # compiled: steps (the trials' speed-up from compiling follows from the step figures). Each then
    # profiles 3 steps of every objective: GPU kernel time against wall time, top kernels in profile.txt.
    # SECTIONS=steps: the step figures alone (312 s in one run, most of it compiling).
    common="--device cuda --model vit_b16 --steps 20 --repeats 2 --trials 3 --jpegs 200 --profile 3"
    # shellcheck disable=SC2086
    timeout 260 python3 benchmarks/throughput.py $common --warmup 3 --sections "${SECTIONS:-steps,trial,data}" \
        --out "$OUT/eager" 2>&1 | tee -a "$log" || echo "eager run failed or timed out" | tee -a "$log"
    # shellcheck disable=SC2086
    timeout 240 python3 benchmarks/throughput.py $common --warmup 5 --compile --sections steps \
        --out "$OUT/compiled" 2>&1 | tee -a "$log" || echo "compiled run failed or timed out" | tee -a "$log"
    ;;
*)
    echo "usage: $0 fetch|run|trials" >&2
    exit 2
    ;;
esac
