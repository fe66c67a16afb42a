#!/usr/bin/env bash
# Catalog SQL against DuckDB on the same Parquet files, same machine, one run.
#   ROWS (10,000,000), SHARDS (10), REPEATS (5), THREADS (2), BENCH_ROOT (/tmp/llamagen-bench-catalog)
# Prints the median time of each query for both engines and the ratio llamagen / DuckDB.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-10000000}
SHARDS=${SHARDS:-10}
REPEATS=${REPEATS:-5}
THREADS=${THREADS:-2}
ROOT=${BENCH_ROOT:-/tmp/llamagen-bench-catalog}
PY=${LLAMAGEN_PYTHON:-.venv/bin/python}

cargo build --profile bench-opt -p llamagen-catalog --example sql_bench
BIN=target/bench-opt/examples/sql_bench

if [ ! -f "$ROOT/.rows-$ROWS-$SHARDS" ]; then
  rm -rf "$ROOT"
  "$BIN" generate "$ROOT" "$ROWS" "$SHARDS" > /dev/null
  touch "$ROOT/.rows-$ROWS-$SHARDS"
fi

Q1="SELECT status, count(*) AS n FROM samples GROUP BY status ORDER BY status"
Q2="SELECT key, url, score_aesthetic FROM samples WHERE score_aesthetic BETWEEN 7.9 AND 8.0"
Q3="SELECT count(*) AS n, avg(score_clip_similarity) AS clip FROM samples WHERE score_aesthetic >= 6.5"

ours=$(mktemp); theirs=$(mktemp)
# Alternate the engines so drift on a shared machine hits both alike.
for round in 1 2; do
  "$BIN" query "$ROOT" "$REPEATS" "$Q1" "$Q2" "$Q3" >> "$ours"
  "$PY" bench/catalog_sql_duckdb.py "$ROOT" "$REPEATS" "$THREADS" "$Q1" "$Q2" "$Q3" >> "$theirs"
done
"$PY" - "$ours" "$theirs" "$ROWS" "$THREADS" <<'PYEOF'
import json, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1])]
theirs = [json.loads(l) for l in open(sys.argv[2])]
print(f"{int(sys.argv[3]):,} rows, {sys.argv[4]} threads; median wall seconds over all repeats")
print(f"{'query':<100} {'llamagen':>9} {'duckdb':>9} {'ratio':>6}")
for q in dict.fromkeys(r["query"] for r in ours):
    a = statistics.median(t for r in ours if r["query"] == q for t in r["times_s"])
    b = statistics.median(t for r in theirs if r["query"] == q for t in r["times_s"])
    ra = {r["result_rows"] for r in ours if r["query"] == q}
    rb = {r["result_rows"] for r in theirs if r["query"] == q}
    assert ra == rb, f"result rows differ: {ra} vs {rb} for {q}"
    print(f"{q[:100]:<100} {a:>9.4f} {b:>9.4f} {a / b:>6.2f}")
opens = [r["open_s"] for r in ours]
print(f"llamagen session open (reads the table log only), median: {statistics.median(opens):.4f} s")
PYEOF
rm -f "$ours" "$theirs"
