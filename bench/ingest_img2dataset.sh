#!/usr/bin/env bash
# Ingest against img2dataset, side by side in one run: the same URL list of generated web-like
# images (long side 300-1600 px) served by nginx on four loopback hosts (127.0.0.1-4), at 256 and
# 512 px, with the web's faults: 10 % of the rows are, in equal parts, 404, 403, 500, HTML,
# corrupt bytes, refused connections, resets, truncated bodies, headers that never come and
# bodies dripping for 6 s (bench/fault_server.py on 127.0.0.5; nothing listens on 127.0.0.6).
# Reports images/s, CPU seconds per image (user+sys of the whole process tree), peak RSS of the
# tree and success counts of both (bench/proctree.py measures), then the outcome of each fault
# kind for both (llamagen's from its catalog, img2dataset's from its metadata).
#
# Usage: [CORPUS=DIR] [WEB_FAULTS=0] bench/ingest_img2dataset.sh [N_IMAGES] [SIZES]
#   N_IMAGES defaults to 2000, SIZES to "256 512"; WEB_FAULTS=0 gives the earlier list (4 % of
#   404, corrupt and HTML rows, one host).
# Both run with a 5 s timeout and no retries. img2dataset runs as its README suggests for one
# machine: resize_mode=center_crop, output_format=parquet, 2 processes x 32 threads, shards of
# N/4 rows so both processes work. llamagen runs `llamagen ingest` with 64 downloads in flight
# (no per-host limit below that, as img2dataset has none), units of N/4 rows, and
# --upscale-small-images, since img2dataset upscales pictures smaller than the target size.
# Needs: nginx (installed with apt-get when missing and running as root), PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
WEB_FAULTS=${WEB_FAULTS:-1}
SIZES=${2:-256 512}
PY=.venv/bin/python
[ -x "$PY" ] || make setup
$PY -c "import PIL" 2>/dev/null || $PY -m pip install -q Pillow==13.0.0
# img2dataset in its own environment (it pins its own dependencies).
I2D=.venv-img2dataset
if [ ! -x "$I2D/bin/img2dataset" ]; then
  python3 -m venv "$I2D"
  "$I2D/bin/pip" install -q -r bench/requirements-img2dataset.txt
fi
if ! command -v nginx >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q nginx-light >/dev/null 2>&1 ||
      (apt-get update -q >/dev/null && apt-get install -y -q nginx-light >/dev/null)
  else
    echo "nginx is not installed (apt-get install nginx-light)" >&2
    exit 1
  fi
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=${PROFILE:-dev}
cargo build -q --profile "$PROFILE" -p llamagen-pipelines --bin llamagen
BIN=$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/llamagen

WORK=$(mktemp -d)
NGINX_PID=
cleanup() {
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
  [ -n "$FAULT_PID" ] && kill "$FAULT_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# CORPUS=DIR keeps the generated images and URL list in DIR and reuses them on later runs (the
# URLs name the port, which is kept with them).
CORPUS=${CORPUS:-$WORK/corpus}
chmod 755 "$WORK"  # nginx workers run as an unprivileged user
if [ ! -f "$CORPUS/list.parquet" ] || [ "$(cat "$CORPUS/n" 2>/dev/null)" != "$N $WEB_FAULTS" ]; then
  rm -rf "$CORPUS"
  mkdir -p "$CORPUS/www"
  $PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" >"$CORPUS/port"
  P=$(cat "$CORPUS/port")
  echo "generating $N images ..."
  if [ "$WEB_FAULTS" = 1 ]; then
    FAULT_BASE="http://127.0.0.5:$P" REFUSED_BASE="http://127.0.0.6:$P" FAULT_SHARE=0.10 \
      $PY bench/ingest_corpus.py "$CORPUS/www" "$CORPUS/list.parquet" \
      "http://127.0.0.1:$P,http://127.0.0.2:$P,http://127.0.0.3:$P,http://127.0.0.4:$P" "$N"
  else
    $PY bench/ingest_corpus.py "$CORPUS/www" "$CORPUS/list.parquet" "http://127.0.0.1:$P" "$N"
  fi
  echo "$N $WEB_FAULTS" >"$CORPUS/n"
fi
chmod 755 "$CORPUS" "$CORPUS/www"
PORT=$(cat "$CORPUS/port")
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  types { image/jpeg jpg; image/png png; image/webp webp; text/html html; }
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  server {
    listen 127.0.0.1:$PORT; listen 127.0.0.2:$PORT; listen 127.0.0.3:$PORT; listen 127.0.0.4:$PORT;
    root $CORPUS/www;
  }
}
EOF
nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
NGINX_PID=$!
FAULT_PID=
if [ "$WEB_FAULTS" = 1 ]; then
  $PY bench/fault_server.py "$CORPUS/www" 127.0.0.5 "$PORT" &
  FAULT_PID=$!
fi
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/000001.jpg" 2>/dev/null && break; sleep 0.1; done
du -sh "$CORPUS/www" | awk '{print "corpus: " $1}'

SHARD=$(( (N + 3) / 4 ))
for S in $SIZES; do
  rm -rf "$WORK/i2d" "$WORK/ours"
  NO_ALBUMENTATIONS_UPDATE=1 $PY bench/proctree.py "$WORK/i2d-$S.json" -- \
    "$I2D/bin/img2dataset" --url_list "$CORPUS/list.parquet" --input_format parquet \
    --url_col URL --caption_col TEXT --output_format parquet --output_folder "$WORK/i2d" \
    --processes_count 2 --thread_count 32 --image_size "$S" --resize_mode center_crop \
    --encode_quality 95 --number_sample_per_shard "$SHARD" --timeout 5 --retries 0 \
    --enable_wandb False --distributor multiprocessing >"$WORK/i2d-$S.log" 2>&1 ||
    { tail -20 "$WORK/i2d-$S.log"; exit 1; }
  I2D_OK=$($PY -c "import glob, json, sys; print(sum(json.load(open(f))['successes'] for f in glob.glob(sys.argv[1] + '/*_stats.json')))" "$WORK/i2d")
  $PY bench/proctree.py "$WORK/ours-$S.json" -- \
    "$BIN" ingest --input "$CORPUS/list.parquet" --root "$WORK/ours" --image-size "$S" \
    --allow-cidr 127.0.0.0/8 --unit-rows "$SHARD" --concurrency 64 --per-host 64 --upscale-small-images \
    --timeout 5 --retries 0 >"$WORK/ours-$S.log" 2>&1 || { tail -20 "$WORK/ours-$S.log"; exit 1; }
  "$BIN" catalog sql "SELECT text, status, error_kind FROM samples" --root "$WORK/ours" \
    --format json >"$WORK/ours-$S-rows.json"
  OURS_OK=$("$BIN" catalog sql "SELECT count(*) AS n FROM samples WHERE status = 'ok'" \
    --root "$WORK/ours" --format json | $PY -c "import json, sys; print(json.loads(sys.stdin.readline())['n'])")
  $PY - "$S" "$N" "$WORK/i2d-$S.json" "$I2D_OK" "$WORK/ours-$S.json" "$OURS_OK" <<'PYEOF'
import json, sys
s, n = sys.argv[1], int(sys.argv[2])
i, i_ok = json.load(open(sys.argv[3])), int(sys.argv[4])
o, o_ok = json.load(open(sys.argv[5])), int(sys.argv[6])
def line(name, r, ok):
    return (f"  {name:<11} {ok:>5} ok of {n}, {ok / r['wall_s']:7.1f} images/s, "
            f"{1000 * r['cpu_s'] / max(ok, 1):6.2f} ms CPU/image (user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s), "
            f"peak RSS {r['peak_rss_mb']:7.1f} MB")
print(f"{s} px:")
if not i_ok or not o_ok:
    sys.exit(f"no successes (img2dataset {i_ok}, llamagen {o_ok}): is the server reachable?")
print(line("img2dataset", i, i_ok))
print(line("llamagen", o, o_ok))
cpu_ratio = (o['cpu_s'] / max(o_ok, 1)) / (i['cpu_s'] / max(i_ok, 1))
print(f"  llamagen/img2dataset: CPU per image {cpu_ratio:.2f}x (target <= 0.45), "
      f"peak RSS {o['peak_rss_mb'] / i['peak_rss_mb']:.2f}x (target <= 0.5), "
      f"images/s {(o_ok / o['wall_s']) / (i_ok / i['wall_s']):.2f}x (target >= 1.5), "
      f"same successes: {o_ok == i_ok}")
PYEOF
  # Outcomes per kind of row: how many succeeded, and the commonest error of each tool.
  $PY - "$WORK/ours-$S-rows.json" "$WORK/i2d" <<'PYEOF'
import collections, glob, json, sys
import pyarrow.parquet as pq
def kind(text):
    return text.split()[1] if text and text.startswith("fault ") else "good"
ours = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    r = json.loads(line)
    ours[kind(r.get("text"))][r.get("error_kind") or r["status"]] += 1
theirs = collections.defaultdict(collections.Counter)
for f in glob.glob(sys.argv[2] + "/*.parquet"):
    t = pq.read_table(f, columns=["caption", "status", "error_message"]).to_pylist()
    for r in t:
        # Messages carry byte counts and addresses: keep their first clause.
        err = (r["error_message"] or r["status"] or "").split("(")[0].strip()[:40]
        theirs[kind(r["caption"])][err] += 1
print(f"  {'rows':<11} {'n':>5}  {'llamagen':<40} img2dataset")
for k in sorted(set(ours) | set(theirs), key=lambda k: (k != "good", k)):
    n = sum(ours[k].values())
    fmt = lambda c: ", ".join(f"{v} {e}" for e, v in c.most_common(2))
    print(f"  {k:<11} {n:>5}  {fmt(ours[k]):<40} {fmt(theirs[k])}")
PYEOF
done
