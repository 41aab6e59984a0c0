#!/usr/bin/env bash
# GPU check of the speed work: benchmarks/throughput.py on CUDA with CLIP ViT-B/16 (random weights),
# eager and torch.compile'd, on one H100/H200, meant to finish in under 5 minutes (budget below; it
# has not run on a device yet: the session that wrote it had none).
#
# The device machine has torch, torchvision, Lightning, pandas, timm, huggingface_hub and the rest of
# the scientific stack (see /work/.library/device/KINDS.md) but no network and none of open_clip,
# wilds, Hydra or Optuna. So, in two steps:
#
#   benchmarks/gpu_check.sh fetch   # here, with network and the project's .venv: the missing wheels
#                                   # (same versions as .venv) into .whl/, which git ignores locally
#   benchmarks/gpu_check.sh run     # there (device tool: carry [".whl"], command
#                                   # "bash benchmarks/gpu_check.sh run", timeout_s 420): installs the
#                                   # wheels offline into /tmp/site, runs, writes to $OUT (or ./gpu_check_out)
#
# Budget of "run" (estimated from the issue's ViT-B/16 figure, ~2,400 images/s at batch 256; never run):
# installs and imports ~20 s; eager (~100 s): steps, 6 objectives interleaved for 3 + 20 rounds ~25 s,
# search trials (world generation and its 224-px cache ~20 s, 2 trials of the embedded search ~10 s),
# data path (200 JPEGs written, decoded, cached) ~30 s; compiled steps (~120 s): compilation of the
# image tower ~60-90 s, then 5 + 20 rounds ~15 s. Each run has its own timeout (150 s, 200 s).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 wilds==2.0.0 outdated==0.2.2 littleutils==0.2.4
        pytz==2026.6 hydra-core==1.3.8 omegaconf==2.3.1 optuna==5.0.0 alembic==1.20.1 Mako==1.4.3
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
run)
    OUT="${OUT:-$PWD/gpu_check_out}"
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 AUTOFT_CACHE=/tmp/autoft-cache WANDB_MODE=disabled
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
    # eager: steps, trials on the embedded world's default search (generated here, ~10 s), data path;
    # compiled: steps (the trials' speed-up from compiling follows from the step figures)
    common="--device cuda --model vit_b16 --steps 20 --repeats 2 --trials 2 --jpegs 200"
    # shellcheck disable=SC2086
    timeout 150 python3 benchmarks/throughput.py $common --warmup 3 --out "$OUT/eager" 2>&1 \
        | tee "$OUT/eager.log" || echo "eager run failed or timed out"
    # shellcheck disable=SC2086
    timeout 200 python3 benchmarks/throughput.py $common --warmup 5 --compile --sections steps \
        --out "$OUT/compiled" 2>&1 | tee "$OUT/compiled.log" || echo "compiled run failed or timed out"
    cat "$OUT"/*/throughput.md 2>/dev/null || true
    ;;
*)
    echo "usage: $0 fetch|run" >&2
    exit 2
    ;;
esac
