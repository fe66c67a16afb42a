#!/usr/bin/env bash
# pHash throughput: llamagen-dedup (rayon, one thread per core) against PyPI's imagehash.phash
# run as a user would (multiprocessing.Pool(os.cpu_count()), and a single process), on the same
# N JPEGs (default 5,000: random crops of the bundled photos, resized to 256-1024 px on the
# longer side, quality 70-95, seeded; cached in .cache/dedup-bench). Each side runs REPEAT times
# (default 3): min / median / max images/s, and the ratio of the medians. The XOR of all hashes
# must be equal on both sides (the same hashes, bit for bit, up to decoder differences).
#
# Then the grouping time of GROUP_ROWS (default "1000000 10000000") synthetic hashes through the
# catalog (dedup/examples/group_bench.rs).
#
# Usage: bench/dedup.sh [N] [REPEAT]
#   PY=path/to/python     a Python with bench/requirements-dedup.txt (default: .cache/venv-dedup,
#                         created on first use)
#   PROFILE=release|bench-opt (default release)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
REPEAT=${2:-3}
PY=${PY:-.cache/venv-dedup/bin/python}
if [ ! -x "$PY" ]; then
  python3 -m venv .cache/venv-dedup
  .cache/venv-dedup/bin/pip install -q -r bench/requirements-dedup.txt
  PY=.cache/venv-dedup/bin/python
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=${PROFILE:-release}
cargo build -q --profile "$PROFILE" -p llamagen-dedup --example phash_bench
BIN=$CARGO_TARGET_DIR/$PROFILE/examples/phash_bench

DIR=.cache/dedup-bench/jpeg-$N
if [ ! -f "$DIR/.done" ]; then
  mkdir -p "$DIR"
  "$PY" - "$DIR" "$N" <<'PYEOF'
import os, random, sys
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
src = []
for d, _, names in os.walk("data/images"):
    for name in sorted(names):
        try:
            im = Image.open(os.path.join(d, name)); im.load(); im = im.convert("RGB")
        except Exception:
            continue
        if min(im.size) >= 128:
            src.append(im)
for i in range(n):
    im = src[i % len(src)]
    w, h = im.size
    cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    c = im.crop((x, y, x + cw, y + ch))
    s = rng.randint(256, 1024) / max(cw, ch)
    c = c.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.BICUBIC)
    c.save(os.path.join(out, f"{i:05d}.jpg"), quality=rng.randint(70, 95))
print(f"{n} JPEGs from {len(src)} photos", file=sys.stderr)
PYEOF
  touch "$DIR/.done"
fi
echo "inputs: $(ls "$DIR" | wc -l) JPEGs ($(du -sh "$DIR" | cut -f1)), cores: $(nproc), repeat: $REPEAT"

run() { for _ in $(seq "$REPEAT"); do "$@"; done; }
RUST=$(run "$BIN" "$DIR")
POOL=$(run "$PY" bench/dedup_reference.py pool "$DIR")
SINGLE=$(run "$PY" bench/dedup_reference.py single "$DIR")
echo "$RUST"; echo "$POOL"; echo "$SINGLE"
"$PY" - "$RUST" "$POOL" "$SINGLE" <<'PYEOF'
import json, statistics, sys
runs = [[json.loads(l) for l in a.splitlines()] for a in sys.argv[1:]]
names = ["llamagen (rayon, %d threads)" % runs[0][0]["threads"],
         "imagehash Pool(%d)" % runs[1][0]["processes"], "imagehash 1 process"]
med = []
for name, rs in zip(names, runs):
    v = sorted(r["images_per_s"] for r in rs)
    med.append(statistics.median(v))
    print(f"{name:32s} images/s min {v[0]:9.1f}  median {med[-1]:9.1f}  max {v[-1]:9.1f}  "
          f"errors {rs[0]['errors']}  xor {rs[0]['xor']}")
print(f"ratio of medians: llamagen / Pool = {med[0] / med[1]:.2f}x, llamagen / 1 process = {med[0] / med[2]:.2f}x")
same = runs[0][0]["xor"] == runs[1][0]["xor"]
print("hash XOR equal on both sides:", same)
PYEOF

# Grouping through the catalog: GROUP_ROWS synthetic pHashes (10 % planted near-duplicates within
# the threshold), written to a catalog under .cache/dedup-group-N once, then the perceptual
# grouping (default threshold, banded LSH in SQL) timed; every planted copy must be found.
cargo build -q --profile "$PROFILE" -p llamagen-dedup --example group_bench
for ROWS in ${GROUP_ROWS:-1000000 10000000}; do
  "$CARGO_TARGET_DIR/$PROFILE/examples/group_bench" ".cache/dedup-group-$ROWS" "$ROWS"
done
