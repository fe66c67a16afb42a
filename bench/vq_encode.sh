#!/usr/bin/env bash
# On-demand benchmark (not part of the tests): VQ-16 encode throughput at 256 px with random
# weights of the real config, llamagen (candle, CPU) against PyTorch (bench/vq_encode_torch.py,
# the model written from the spec), same machine, same thread count, one run each.
#
# `llamagen` sets glibc's allocator to keep freed memory (kernels/src/alloc.rs); PyTorch runs
# first with glibc's defaults, as it is usually run, then once more with the same allocator
# settings (GLIBC_TUNABLES), and both ratios are printed.
#
#   bench/vq_encode.sh                      # REPEATS=3 BATCH=4 THREADS=$(nproc)
#
# Installs torch (requirements-bench.txt) into ./.venv if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${REPEATS:-3}
BATCH=${BATCH:-4}
THREADS=${THREADS:-$(nproc)}
VENV=${VENV:-.venv}
TARGET=${CARGO_TARGET_DIR:-target}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q -r requirements-bench.txt

# The dev profile builds candle, gemm and llamagen-encode at opt-level 3 (Cargo.toml).
cargo build -p llamagen-encode --example vq_encode_bench
echo "machine: $(nproc) cores, $(uname -m), threads $THREADS; repeats $REPEATS; 256px batch $BATCH" >&2
OURS=$(RAYON_NUM_THREADS=$THREADS "$TARGET/debug/examples/vq_encode_bench" "$REPEATS" "$BATCH")
THEIRS=$(OMP_NUM_THREADS=$THREADS "$VENV/bin/python" bench/vq_encode_torch.py --repeats "$REPEATS" \
  --batch "$BATCH" --threads "$THREADS")
# The settings of llamagen_kernels::alloc::reuse_freed_memory, as glibc tunables.
SAME_ALLOC=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824
THEIRS_ALLOC=$(GLIBC_TUNABLES=$SAME_ALLOC OMP_NUM_THREADS=$THREADS "$VENV/bin/python" \
  bench/vq_encode_torch.py --repeats "$REPEATS" --batch "$BATCH" --threads "$THREADS")
echo "$OURS"
echo "$THEIRS"
echo "$THEIRS_ALLOC"
"$VENV/bin/python" - "$OURS" "$THEIRS" "$THEIRS_ALLOC" <<'PY'
import json, sys
o, t, ta = (json.loads(a) for a in sys.argv[1:4])
print(f"llamagen {o['images_per_s']:.2f} images/s, pytorch {t['images_per_s']:.2f} images/s: "
      f"ratio {o['images_per_s'] / t['images_per_s']:.2f}x (target >= 1x); "
      f"encoder share: llamagen {min(o['encoder_s']) / min(o['step_s']):.0%}, "
      f"pytorch {min(t['encoder_s']) / min(t['step_s']):.0%}")
print(f"pytorch with llamagen's allocator settings {ta['images_per_s']:.2f} images/s: "
      f"ratio {o['images_per_s'] / ta['images_per_s']:.2f}x")
PY
