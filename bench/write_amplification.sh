#!/usr/bin/env bash
# Write amplification of the catalog: bytes written to storage by a whole pipeline divided by the
# bytes of the final dataset (the shards of its latest version).
#   bench/write_amplification.sh                  the synthetic pipeline (catalog/examples/write_amp.rs):
#                                                 ROWS (10000) samples, IMAGE_KB (64) images, T5_KB (250)
#                                                 T5 features, ingest then four stage passes
#   bench/write_amplification.sh ROOT [DATASET]   a catalog a pipeline wrote (e.g. `make run`'s
#                                                 out/pipeline): every file under the data/ and
#                                                 _delta_log/ of the dataset's table and of its
#                                                 column-group tables (replaced shards stay until gc)
#                                                 against the live shards' bytes
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ge 1 ]; then
  root=$1; dataset=${2:-samples}
  # The dataset's table and its column-group tables (<dataset>.images, .t5, .vq).
  data=0; log=0
  for t in "$root/$dataset" "$root/$dataset".images "$root/$dataset".t5 "$root/$dataset".vq; do
    [ -d "$t" ] || continue
    data=$((data + $(du -sb "$t/data" 2>/dev/null | cut -f1 || echo 0)))
    log=$((log + $(du -sb "$t/_delta_log" | cut -f1)))
  done
  bin=${LLAMAGEN_BIN:-target/debug/llamagen}
  final=$("$bin" catalog sql "SELECT sum(bytes + column_bytes) AS b FROM shards" --root "$root" --dataset "$dataset" --format csv | tail -1)
  python3 -c "import sys; d,l,f=map(int,sys.argv[1:]); print(f'data {d:,} B + log {l:,} B written, final dataset {f:,} B: write amplification {(d+l)/f:.2f}')" "$data" "$log" "$final"
  exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo run -q -p llamagen-catalog --example write_amp -- "$dir/root" "${ROWS:-10000}" "${IMAGE_KB:-64}" "${T5_KB:-250}"
