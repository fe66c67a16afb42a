#!/usr/bin/env bash
# The main job on the embedded default: local folders and the bundled sample data.
#  1. import the bundled LAION URL list (10,000 real rows) into a catalog;
#  2. run the data pipeline (configs/pipeline/sample.toml) on the bundled real images, served on
#     127.0.0.1 by a local HTTP server: ingest (edge cases and broken files included), filter
#     scores and verdicts, long and short captions, T5 features and VQ codes, dataset-wide
#     duplicates, with stand-in models;
#  3. show what is in the catalog (stats, SQL, verification);
#  4. train a tiny text-to-image GPT on the ready shards for a few CPU steps and sample a grid;
#  5. run the model conformance checks against the bundled reference tensors.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
export OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
BIN=${LLAMAGEN_BIN:-target/debug/llamagen}
PY=${LLAMAGEN_PYTHON:-python3}
mkdir -p "$OUT"

echo "== 1. import the bundled LAION URL list into $OUT/laion"
"$BIN" catalog import data/laion_meta/img2dataset_test_10000.parquet --root "$OUT/laion"
"$BIN" catalog sql --root "$OUT/laion" \
  "SELECT split_part(url, '/', 3) AS host, count(*) AS samples FROM samples
   GROUP BY host ORDER BY samples DESC, host LIMIT 5"

echo "== 2. the data pipeline on the bundled images: ingest -> filters -> captions -> T5 -> VQ codes -> dedup"
# The images are served by a local HTTP server on 127.0.0.1, as a mirror would serve them; the URL
# list and a long-caption file (joined by URL) are made from the bundled images' manifest.
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$PY" -m http.server "$PORT" --bind 127.0.0.1 --directory data/images >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
"$PY" - "$PORT" "$OUT/images.jsonl" "$OUT/long_captions.jsonl" <<'PYEOF'
import json, sys, urllib.parse
port, out, caps = sys.argv[1], sys.argv[2], sys.argv[3]
with open("data/images_manifest.jsonl") as f, open(out, "w") as o, open(caps, "w") as c:
    for line in f:
        m = json.loads(line)
        rel = m["relpath"].removeprefix("images/")
        url = f"http://127.0.0.1:{port}/" + urllib.parse.quote(rel)
        name = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("_", " ")
        o.write(json.dumps({"URL": url, "TEXT": name, "WIDTH": m["width"], "HEIGHT": m["height"]}) + "\n")
        tags = ", ".join(m.get("tags") or []) or "none"
        long = (f"The image {name} from the {m.get('source', 'bundled')} collection. "
                f"It is a {m.get('format')} file of {m['width']} by {m['height']} pixels (tags: {tags}).")
        c.write(json.dumps({"url": url, "caption": long}) + "\n")
PYEOF
for _ in $(seq 50); do "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break; sleep 0.1; done
rm -rf "$OUT/pipeline" "$OUT/webdataset"
"$BIN" pipeline check configs/pipeline/sample.toml --input "$OUT/images.jsonl" --root "$OUT/pipeline"
"$BIN" pipeline run configs/pipeline/sample.toml --input "$OUT/images.jsonl" --root "$OUT/pipeline" \
  --report-json "$OUT/pipeline-report.json"
# (a second run finds nothing to do: every unit and shard stage is already committed)
kill $SERVER 2>/dev/null || true

echo "== 3. what is in the catalog"
"$BIN" catalog stats --root "$OUT/pipeline"
"$BIN" catalog sql --root "$OUT/pipeline" \
  "SELECT status, coalesce(error_kind, '') AS error_kind, count(*) AS samples,
          count(vq_codes) AS with_codes, count(t5_long) AS with_t5
   FROM samples GROUP BY status, error_kind ORDER BY samples DESC"
"$BIN" catalog sql --root "$OUT/pipeline" \
  "SELECT key, short_caption FROM samples WHERE status = 'ok' ORDER BY key LIMIT 3"
echo "-- duplicates across the dataset ([dedup]: kept rows have no dup_kind; training and export skip the others)"
"$BIN" catalog sql --root "$OUT/pipeline" \
  "SELECT d.dup_kind, split_part(d.url, '/', 5) AS duplicate, split_part(k.url, '/', 5) AS kept
   FROM samples d JOIN samples k ON d.duplicate_of = k.key
   WHERE d.dup_kind IN ('exact', 'perceptual', 'semantic') ORDER BY d.dup_kind, duplicate"
echo "-- retuning without rehashing: a dry run at 8 bits (nothing written; chart in $OUT/dedup-dry-run.html)"
"$BIN" dedup --root "$OUT/pipeline" --kinds exact,perceptual --hamming 8 --dry-run --chart "$OUT/dedup-dry-run.html" | tail -n 4
"$BIN" catalog verify --root "$OUT/pipeline"
echo "-- the ingested images in img2dataset's webdataset layout (written by ingest, before the filters):"
for t in "$OUT"/webdataset/256/*.tar; do
  echo "$(basename "$t"): $(tar tf "$t" | grep -c '\.jpg$') samples ($(tar tf "$t" | head -n 3 | paste -sd' ' -) ...)"
done

echo "== 4. a short CPU training run on the ready shards, then a sample grid"
sed -e "s#\"out/#\"$OUT/#" configs/pipeline/train_t2i_sample.toml > "$OUT/train_t2i_sample.toml"
rm -rf "$OUT/train_t2i_sample"
"$BIN" train --config "$OUT/train_t2i_sample.toml"
KEYS=$("$BIN" catalog sql --root "$OUT/pipeline" --format csv \
  "SELECT key FROM samples WHERE status = 'ok' AND t5_long IS NOT NULL ORDER BY key LIMIT 4" | tail -n +2 | paste -sd, -)
"$BIN" sample --checkpoint "$OUT/train_t2i_sample/checkpoints/0000012" --vq "$OUT/models/vq_standin.safetensors" \
  --vq-args configs/pipeline/vq_standin.json --catalog "$OUT/pipeline" --keys "$KEYS" \
  --cfg-scale 4 --top-k 100 --seed 0 --out "$OUT/samples.png"
echo "sample grid: $OUT/samples.png (stand-in models: noise, not pictures)"
"$BIN" sample --checkpoint "$OUT/train_t2i_sample/checkpoints/0000012" --vq "$OUT/models/vq_standin.safetensors" \
  --vq-args configs/pipeline/vq_standin.json --t5 encode/tests/fixtures/t5/gated \
  --t5-tokenizer encode/tests/fixtures/t5/tokenizer.json \
  --prompt "a red bicycle leaning against a brick wall" --prompt "two dogs playing in the snow" \
  --seed 0 --out "$OUT/prompt_samples.png" --npz "$OUT/prompt_samples.npz"
echo "typed prompts: $OUT/prompt_samples.png and the ADM sample batch $OUT/prompt_samples.npz"

echo "== 5. model conformance against the bundled reference tensors"
"$BIN" conformance data/parity | tail -n 3
