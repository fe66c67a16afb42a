#!/usr/bin/env bash
# On-demand benchmark (not part of the tests): one VQ tokenizer training step (VQ forward,
# LPIPS-VGG16, PatchGAN, backward, clipping, Adam for model and discriminator), llamagen (candle)
# against PyTorch (bench/vq_train_step_torch.py, the reference model written from the spec) on
# the CPU of this machine, same configuration and thread count, one run each.
#
#   bench/vq_train_step.sh                  # REPEATS=3 IMAGE_SIZE=64 BATCH=2 THREADS=$(nproc)
#
# Installs torch (requirements-bench.txt) into ./.venv if it is missing.
#
# One run on a shared 2-core x86_64 VM (load average 2-3.5 from other jobs), 2 threads, 64 px,
# batch 2, bench-opt profile: llamagen 3.2-4.0 s/step, PyTorch 2.15 0.94-1.27 s/step (its
# quieter repeats). A profile puts llamagen's time in candle's CPU kernels (gemm, the
# convolution's data reshuffling, element-wise maps); the input-gradient convolution already
# avoids candle's slow conv_transpose2d (llamagen_encode::conv), which took the step from 8.5 s.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${REPEATS:-3}
IMAGE_SIZE=${IMAGE_SIZE:-64}
BATCH=${BATCH:-2}
THREADS=${THREADS:-$(nproc)}
VENV=${VENV:-.venv}
TARGET=${CARGO_TARGET_DIR:-target}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import torch, PIL, safetensors" 2>/dev/null || "$VENV/bin/python" -m pip install -q -r requirements-bench.txt

cargo build --profile bench-opt -p llamagen-train --example vq_train_step
echo "machine: $(nproc) cores, $(uname -m), threads $THREADS; repeats $REPEATS; ${IMAGE_SIZE}px batch $BATCH" >&2
RAYON_NUM_THREADS=$THREADS "$TARGET/bench-opt/examples/vq_train_step" "$REPEATS" "$IMAGE_SIZE" "$BATCH"
OMP_NUM_THREADS=$THREADS "$VENV/bin/python" bench/vq_train_step_torch.py --repeats "$REPEATS" \
  --image-size "$IMAGE_SIZE" --batch "$BATCH" --threads "$THREADS"
