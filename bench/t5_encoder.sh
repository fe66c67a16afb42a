#!/usr/bin/env bash
# On-demand benchmark: T5 encoder tokens/s of `llamagen` (candle, CPU) against `transformers`
# with the same random FLAN-T5-base-sized weights, threads and real captions (bench/t5_encoder.py).
# Usage: bench/t5_encoder.sh   (BENCH_THREADS=2 BENCH_CAPTIONS=256 BENCH_REPEATS=3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .venv-bench/.ready ] || [ requirements-bench.txt -nt .venv-bench/.ready ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q -r requirements-bench.txt
  touch .venv-bench/.ready
fi
# PROFILE=dev (default: candle and llamagen-encode build at opt-level 3) or PROFILE=bench-opt.
PROFILE=${PROFILE:-dev}
cargo build -q --profile "$PROFILE" -p llamagen-encode --example t5_bench
T5_BENCH_BIN="${CARGO_TARGET_DIR:-target}/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/t5_bench" \
  .venv-bench/bin/python bench/t5_encoder.py
