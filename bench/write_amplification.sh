#!/usr/bin/env bash
# Write amplification of the catalog: bytes written to storage by a whole pipeline divided by the
# bytes of the final dataset (the shards of its latest version).
#   bench/write_amplification.sh                  the synthetic pipeline (catalog/examples/write_amp.rs):
#                                                 ROWS (10000) samples, IMAGE_KB (64) images, T5_KB (250)
#                                                 T5 features, ingest then four stage passes
#   bench/write_amplification.sh ROOT [DATASET]   a catalog a pipeline wrote (e.g. `make run`'s
#                                                 out/pipeline): every file under the dataset's data/
#                                                 and _delta_log/ (replaced shards stay until gc)
#                                                 against the live shards' bytes
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ge 1 ]; then
  root=$1; dataset=${2:-samples}
  data=$(du -sb "$root/$dataset/data" | cut -f1)
  log=$(du -sb "$root/$dataset/_delta_log" | cut -f1)
  bin=${LLAMAGEN_BIN:-target/debug/llamagen}
  final=$("$bin" catalog sql "SELECT sum(bytes) AS b FROM shards" --root "$root" --dataset "$dataset" --format csv | tail -1)
  python3 -c "import sys; d,l,f=map(int,sys.argv[1:]); print(f'data {d:,} B + log {l:,} B written, final dataset {f:,} B: write amplification {(d+l)/f:.2f}')" "$data" "$log" "$final"
  exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo run -q -p llamagen-catalog --example write_amp -- "$dir/root" "${ROWS:-10000}" "${IMAGE_KB:-64}" "${T5_KB:-250}"
