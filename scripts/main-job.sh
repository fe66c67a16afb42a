#!/usr/bin/env bash
# The main job on the embedded default: local folders and the bundled sample data.
#  1. import the bundled LAION URL list (10,000 real rows) into a catalog;
#  2. ingest the bundled real images (served on 127.0.0.1 by a local HTTP server, as a mirror
#     would) into image shards at 256 px, edge cases and broken files included;
#  3. show what is in the catalogs (stats, a SQL query, verification);
#  4. run the model conformance checks against the bundled reference tensors.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
BIN=${LLAMAGEN_BIN:-target/debug/llamagen}
PY=${LLAMAGEN_PYTHON:-python3}
mkdir -p "$OUT"

echo "== 1. import the bundled LAION URL list into $OUT/laion"
"$BIN" catalog import data/laion_meta/img2dataset_test_10000.parquet --root "$OUT/laion"
"$BIN" catalog sql --root "$OUT/laion" \
  "SELECT split_part(url, '/', 3) AS host, count(*) AS samples FROM samples
   GROUP BY host ORDER BY samples DESC, host LIMIT 5"

echo "== 2. ingest the bundled images through a local HTTP server into $OUT/images"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$PY" -m http.server "$PORT" --bind 127.0.0.1 --directory data/images >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
"$PY" - "$PORT" "$OUT/images.jsonl" <<'PYEOF'
import json, sys, urllib.parse
port, out = sys.argv[1], sys.argv[2]
with open("data/images_manifest.jsonl") as f, open(out, "w") as o:
    for line in f:
        m = json.loads(line)
        rel = m["relpath"].removeprefix("images/")
        url = f"http://127.0.0.1:{port}/" + urllib.parse.quote(rel)
        o.write(json.dumps({"URL": url, "TEXT": rel, "WIDTH": m["width"], "HEIGHT": m["height"]}) + "\n")
PYEOF
for _ in $(seq 50); do "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break; sleep 0.1; done
"$BIN" ingest --input "$OUT/images.jsonl" --root "$OUT/images" --image-size 256 --allow-cidr 127.0.0.0/8
kill $SERVER 2>/dev/null || true

echo "== 3. what is in the image catalog"
"$BIN" catalog stats --root "$OUT/images"
"$BIN" catalog sql --root "$OUT/images" \
  "SELECT orig_format, count(*) AS images, CAST(avg(content_bytes) AS BIGINT) AS avg_bytes
   FROM samples WHERE status = 'ok' GROUP BY orig_format ORDER BY images DESC"
"$BIN" catalog verify --root "$OUT/images"

echo "== 4. model conformance against the bundled reference tensors"
"$BIN" conformance data/parity | tail -n 3
