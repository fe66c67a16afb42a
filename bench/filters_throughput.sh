#!/usr/bin/env bash
# End-to-end scoring throughput of the filter stage (decode, CLIP and watermark preprocessing,
# tokenization, CLIP B/32 image+text, CLIP L/14 image + aesthetic head, watermark classifier)
# against the same work in Python (PIL + numpy + Python onnxruntime), same ONNX models, same
# thread count, same machine, one run each, side by side.
#
# Usage: bench/filters_throughput.sh [MODEL_DIR] [THREADS] [BATCH] [REPEAT]
#   MODEL_DIR defaults to the stand-in models of filters/tests/models (tiny: the comparison is
#   then about decoding and preprocessing); pass the directory written by
#   scripts/export_filter_models.py to compare with the real CLIP/watermark models.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${1:-filters/tests/models}
THREADS=${2:-$(nproc)}
BATCH=${3:-32}
REPEAT=${4:-8}
PY=.venv/bin/python
[ -x "$PY" ] || make setup
$PY -c "import PIL, ftfy, regex" 2>/dev/null || $PY -m pip install -q Pillow==13.0.0 ftfy==6.3.1 regex==2026.11.15
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
# PROFILE=dev (default: the hot crates, llamagen-filters included, build at opt-level 3; minutes)
# or PROFILE=bench-opt (everything optimised; far longer to build).
PROFILE=${PROFILE:-dev}
cargo build -q --profile "$PROFILE" -p llamagen-filters --example score_files
BIN=$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/score_files

# Inputs: the bundled real photos as 512-pixel JPEG renditions (quality 90), as ingest stores them.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PY - "$WORK" <<'PYEOF'
import os, sys
from PIL import Image
out = sys.argv[1]
src = "data/images"
for n in sorted(os.listdir(src)):
    try:
        im = Image.open(os.path.join(src, n)); im.load(); im = im.convert("RGB")
    except Exception:
        continue
    if min(im.size) < 64:
        continue
    s = 512 / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
    im.save(os.path.join(out, os.path.splitext(n)[0] + ".jpg"), quality=90)
PYEOF
FILES=("$WORK"/*.jpg)
echo "inputs: ${#FILES[@]} JPEGs x $REPEAT, models: $MODELS, threads: $THREADS, batch: $BATCH"
RUST=$("$BIN" "$MODELS" "$THREADS" "$BATCH" "$REPEAT" "${FILES[@]}")
PYR=$($PY bench/filters_throughput.py "$MODELS" "$THREADS" "$BATCH" "$REPEAT" "${FILES[@]}")
echo "rust:   $RUST"
echo "python: $PYR"
$PY - "$RUST" "$PYR" <<'PYEOF'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"images/s: llamagen {r['images_per_s']:.1f}, python {p['images_per_s']:.1f}, ratio {r['images_per_s'] / p['images_per_s']:.2f}x")
print(f"llamagen split: inference {r['inference_wall_s']:.2f}s wall of {r['wall_s']:.2f}s; decode {r['decode_thread_s']:.2f} + preprocess {r['preprocess_thread_s']:.2f} thread-s (overlapped)")
print(f"python split:   inference {p['inference_wall_s']:.2f}s, preprocessing {p['preprocess_wall_s']:.2f}s of {p['wall_s']:.2f}s wall")
print(f"preprocessing ms/image, one thread (decode + CLIP 224 + watermark 256): llamagen {r['preprocess_ms_per_image_1thread']:.2f}, PIL {p['preprocess_ms_per_image_1thread']:.2f}, ratio {p['preprocess_ms_per_image_1thread'] / r['preprocess_ms_per_image_1thread']:.2f}x")
PYEOF
