#!/usr/bin/env bash
# Catalog commit cost as the table grows: for each shard count N, import a URL list as N shards of
# SHARD_ROWS rows (one commit), then time one stage pass over all of them (`llamagen filter apply`:
# a copy-on-write rewrite of every shard, committed in groups of LLAMAGEN_COMMIT_SHARDS).
#   SHARDS ("500 2000 8000 20000"), SHARD_ROWS (10), REPEATS (1), BENCH_DIR (/tmp/llamagen-bench-commits),
#   LLAMAGEN_BIN (default: build the bench-opt profile; point it at target/debug/llamagen to skip that)
# Prints, per N: the pass's wall time, the commits it made, its time per shard, the log bytes it
# wrote (the JSON commits and checkpoints added by the pass), and the time per commit.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-"500 2000 8000 20000"}
SHARD_ROWS=${SHARD_ROWS:-10}
REPEATS=${REPEATS:-1}
DIR=${BENCH_DIR:-/tmp/llamagen-bench-commits}
PY=${LLAMAGEN_PYTHON:-python3}

if [ -n "${LLAMAGEN_BIN:-}" ]; then
  BIN=$LLAMAGEN_BIN
else
  cargo build --profile bench-opt -p llamagen-pipelines --bin llamagen
  BIN=target/bench-opt/llamagen
fi

mkdir -p "$DIR"
printf '[min_side]\nmin = 1\n' > "$DIR/thresholds.toml"
printf '%-8s %-7s %10s %8s %14s %14s %12s\n' shards repeat "pass_s" commits "ms/shard" "log_bytes" "ms/commit"
for n in $SHARDS; do
  rows=$((n * SHARD_ROWS))
  list="$DIR/urls-$rows.csv"
  if [ ! -f "$list" ]; then
    "$PY" - "$list" "$rows" <<'PYEOF'
import sys
with open(sys.argv[1], "w") as f:
    f.write("URL,TEXT\n")
    for i in range(int(sys.argv[2])):
        f.write(f"https://example.com/img/{i}.jpg,caption {i}\n")
PYEOF
  fi
  for r in $(seq 1 "$REPEATS"); do
    root="$DIR/root-$n"
    rm -rf "$root"
    "$BIN" catalog import --root "$root" --shard-rows "$SHARD_ROWS" "$list" > /dev/null
    log="$root/samples/_delta_log"
    before=$(du -sb "$log" | cut -f1)
    v0=$(ls "$log" | grep -c '\.json$')
    t0=$(date +%s.%N)
    "$BIN" filter apply --root "$root" --thresholds "$DIR/thresholds.toml" > /dev/null 2>&1
    t1=$(date +%s.%N)
    after=$(du -sb "$log" | cut -f1)
    v1=$(ls "$log" | grep -c '\.json$')
    commits=$((v1 - v0))
    "$PY" - "$n" "$r" "$t0" "$t1" "$commits" "$((after - before))" <<'PYEOF'
import sys
n, r, t0, t1, c, b = sys.argv[1:]
s = float(t1) - float(t0)
print(f"{n:<8} {r:<7} {s:10.2f} {c:>8} {1000*s/int(n):14.3f} {int(b):14,d} {1000*s/max(1,int(c)):12.1f}")
PYEOF
    rm -rf "$root"
  done
done
