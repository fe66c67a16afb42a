#!/usr/bin/env bash
# On-demand benchmark (not part of the tests): a GPT-B c2i training step (256 tokens, batch 2,
# forward + backward + clip + AdamW) and KV-cache sampling with CFG, llamagen (candle) against a
# PyTorch model of the same architecture (bench/train_step_torch.py, written from the spec), on
# the CPU of this machine, one run each, same thread count.
#
#   bench/train_step.sh                     # REPEATS=3 TOKENS=256 THREADS=$(nproc)
#   REPEATS=2 TOKENS=64 bench/train_step.sh
#
# Installs torch (requirements-bench.txt) into ./.venv if it is missing. Targets: step time at
# most 1.25x PyTorch's, sampling at least as fast.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${REPEATS:-3}
TOKENS=${TOKENS:-256}
THREADS=${THREADS:-$(nproc)}
VENV=${VENV:-.venv}
TARGET=${CARGO_TARGET_DIR:-target}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q -r requirements-bench.txt

cargo build --profile bench-opt -p llamagen-train --no-default-features --example bench_train_step
out=$(mktemp -d)
echo "machine: $(nproc) cores, $(uname -m), threads $THREADS; repeats $REPEATS; sampled tokens $TOKENS" >&2
echo "running llamagen (candle)..." >&2
RAYON_NUM_THREADS=$THREADS "$TARGET/bench-opt/examples/bench_train_step" "$REPEATS" "$TOKENS" | tee "$out/rust.json"
echo "running PyTorch..." >&2
OMP_NUM_THREADS=$THREADS "$VENV/bin/python" bench/train_step_torch.py --repeats "$REPEATS" \
  --sample-tokens "$TOKENS" --threads "$THREADS" | tee "$out/torch.json"
"$VENV/bin/python" - "$out/rust.json" "$out/torch.json" <<'PY'
import json, sys
r, t = (json.load(open(p)) for p in sys.argv[1:3])
step = r["step_s"] / t["step_s"]
samp = r["sample_tokens_per_s"] / t["sample_tokens_per_s"]
print(f"training step: llamagen {r['step_s']:.3f} s, PyTorch {t['step_s']:.3f} s -> ratio {step:.2f} (target <= 1.25)")
print(f"sampling: llamagen {r['sample_tokens_per_s']:.2f} tokens/s, PyTorch {t['sample_tokens_per_s']:.2f} tokens/s -> {samp:.2f}x (target >= 1)")
PY
