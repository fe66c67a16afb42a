#!/usr/bin/env bash
# `llamagen serve` (continuous batching, paged KV cache) against the offline sampler, on the CPU,
# with a small random-weight c2i GPT (MODEL below; 16x16 = 256 tokens per image, CFG 4.0, top-k
# 2000, the reference set's VQ): for each CLIENTS level, closed-loop clients send one-image
# requests for BENCH_SECONDS seconds (bench/serve_load.py) to
#   serve        llamagen serve --max-sequences MAX_SEQ
#   serve-seq    llamagen serve --max-sequences 1 (the same engine, one request at a time)
#   offline      one `llamagen sample` process per request, one at a time (the issue's baseline)
#   static       offline static batching: every request waiting when a batch ends goes into
#                the next `llamagen sample --labels ...` run
# and prints images/min and p50/p95 latency per mode and level (one JSON line each).
#   CLIENTS ("1 4 16 64"), BENCH_SECONDS (30), MODES ("serve serve-seq offline static"), MAX_SEQ (64),
#   MODEL (the [model] lines, ';'-separated), BENCH_DIR (/tmp/llamagen-bench-serve),
#   LLAMAGEN_BIN (default: build the release profile; a dev build works, but build it with
#   --config 'profile.dev.package.llamagen-train.opt-level=3' or its paged decoder runs
#   unoptimised), MAKE_CKPT (the random_checkpoint example binary, with LLAMAGEN_BIN),
#   PYTHON (python3)
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-"1 4 16 64"}
SECONDS_PER=${BENCH_SECONDS:-30}
MODES=${MODES:-"serve serve-seq offline static"}
MAX_SEQ=${MAX_SEQ:-64}
MODEL=${MODEL:-'type = "c2i"; dim = 128; n_layer = 4; n_head = 4; image_size = 256; vocab_size = 64; num_classes = 10; class_dropout_prob = 0.1'}
DIR=${BENCH_DIR:-/tmp/llamagen-bench-serve}
PY=${PYTHON:-python3}

if [ -n "${LLAMAGEN_BIN:-}" ]; then
  BIN=$LLAMAGEN_BIN
  if [ -z "${MAKE_CKPT:-}" ]; then
    cargo build -q -p llamagen-serve --example random_checkpoint
    MAKE_CKPT=target/debug/examples/random_checkpoint
  fi
else
  cargo build --release -p llamagen-pipelines --bin llamagen -p llamagen-serve --example random_checkpoint
  BIN=target/release/llamagen
  MAKE_CKPT=target/release/examples/random_checkpoint
fi
mkdir -p "$DIR"
"$MAKE_CKPT" "$DIR/model" "$MODEL" 1 >/dev/null
ARGS="--checkpoint $DIR/model/model.safetensors --config $DIR/model/run.toml --vq data/parity/vq_weights.safetensors --vq-args reduced"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); binary $BIN"

serve_run() { # max_sequences clients
  local log="$DIR/serve.log"
  # shellcheck disable=SC2086
  "$BIN" serve $ARGS --addr 127.0.0.1:0 --max-sequences "$1" --max-queue 1024 >"$log" 2>&1 &
  local pid=$!
  local url=""
  for _ in $(seq 600); do
    url=$(sed -n 's/^listening on //p' "$log")
    [ -n "$url" ] && break
    sleep 0.1
  done
  [ -n "$url" ] || { cat "$log"; kill "$pid"; exit 1; }
  "$PY" bench/serve_load.py http --url "$url" --clients "$2" --seconds "$SECONDS_PER" | sed "s/\"mode\": \"http\"/\"mode\": \"$3\"/"
  kill -TERM "$pid"
  wait "$pid" || true
}

for c in $CLIENTS; do
  for m in $MODES; do
    case $m in
      serve) serve_run "$MAX_SEQ" "$c" serve ;;
      serve-seq) serve_run 1 "$c" serve-seq ;;
      offline) "$PY" bench/serve_load.py offline --bin "$BIN" --model-args "$ARGS" --clients "$c" --seconds "$SECONDS_PER" ;;
      static) "$PY" bench/serve_load.py offline --static --bin "$BIN" --model-args "$ARGS" --clients "$c" --seconds "$SECONDS_PER" ;;
    esac
  done
done
