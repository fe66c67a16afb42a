#!/usr/bin/env bash
# The main job on the embedded default: local folders and the bundled sample data.
# Imports the bundled LAION URL list into a catalog under $OUT, then shows what is in it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
BIN=${LLAMAGEN_BIN:-target/debug/llamagen}
ROOT="$OUT/catalog"
mkdir -p "$OUT"

echo "== import the bundled LAION URL list into $ROOT"
"$BIN" catalog import data/laion_meta/img2dataset_test_10000.parquet --root "$ROOT"

echo "== catalog stats"
"$BIN" catalog stats --root "$ROOT"

echo "== a query: the ten most common URL hosts"
"$BIN" catalog sql --root "$ROOT" \
  "SELECT split_part(url, '/', 3) AS host, count(*) AS samples FROM samples
   GROUP BY host ORDER BY samples DESC, host LIMIT 10"

echo "== committed shards"
"$BIN" catalog sql --root "$ROOT" "SELECT path, rows, bytes, stage FROM shards"

echo "== verify every shard against its manifest entry"
"$BIN" catalog verify --root "$ROOT"
