#!/usr/bin/env bash
# On-demand benchmark (not part of the tests): Inception activations per second of
# `llamagen eval` against the Python evaluator path (bench/eval_reference.py: ADM's evaluator
# flow with PIL and Python onnxruntime) on the same ONNX model, same ONNX Runtime library
# (.venv's onnxruntime wheel, which llamagen loads too), same intra-op threads, same batch size,
# same machine, side by side: each repeat runs llamagen then Python on the PNG folder, then on
# the .npz batch, each a fresh process.
#
#   bench/eval.sh                 # N=5000 REPEATS=3 BATCH=64 THREADS=$(nproc) PROFILE=dev
#   N=1000 REPEATS=2 bench/eval.sh
#
# What is timed: one whole `llamagen eval --sample S --ref STATS.npz --inception M.onnx` (open
# the model, read/decode the N images, Inception activations, statistics, IS, FID, sFID against
# reference statistics, so no reference images and no precision/recall) and one whole
# `python bench/eval_reference.py` doing the same work. images/s = N / process wall time; the
# "activations" figure is N / (time until the activations of the last image are done: for
# llamagen the moment it prints `sample: N images`, for Python its own clock).
#
# The model (bench/make_inception_sized.py) is the real Inception-v3 architecture and size with
# random weights (the real ADM graph cannot be downloaded everywhere; scripts/export-inception.py
# converts it where it can): the throughput is that of the real network, the metrics mean
# nothing. Inputs: N 256x256 crops of the bundled photos (data/images, random crops and flips,
# seed 0), as a folder of PNGs and as one ADM .npz (np.savez, arr_0 uint8 N x 256 x 256 x 3).
# The model and the inputs are made once, into .cache/bench-eval/.
#
# Needs .venv (onnxruntime, numpy: `make setup`; Pillow is added as bench/filters_throughput.sh
# does) and .venv-torch (torch 2.9.1: `make setup-torch`) with torchvision and onnx added in
# .cache/bench-eval/pylib (bench/requirements-eval-model.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-5000}
REPEATS=${REPEATS:-3}
BATCH=${BATCH:-64}
THREADS=${THREADS:-$(nproc)}
# PROFILE=dev (default, as the other benches: llamagen-eval, the image codecs and faer build at
# opt-level 3; ONNX Runtime is the wheel's library either way) or bench-opt / release.
PROFILE=${PROFILE:-dev}
CACHE=.cache/bench-eval
PY=.venv/bin/python
TORCH_PY=.venv-torch/bin/python

[ -x "$PY" ] || make setup
"$PY" -c "import onnxruntime, numpy" 2>/dev/null || make setup
"$PY" -c "import PIL" 2>/dev/null || "$PY" -m pip install -q Pillow==13.0.0
mkdir -p "$CACHE"

# The model, once.
MODEL=$CACHE/inception_sized.onnx
if [ ! -f "$MODEL" ]; then
  [ -x "$TORCH_PY" ] || make setup-torch
  if [ ! -f "$CACHE/pylib/.ready" ] || [ bench/requirements-eval-model.txt -nt "$CACHE/pylib/.ready" ]; then
    "$TORCH_PY" -m pip install -q --upgrade --target "$CACHE/pylib" --no-deps -r bench/requirements-eval-model.txt
    touch "$CACHE/pylib/.ready"
  fi
  PYTHONPATH=$CACHE/pylib "$TORCH_PY" bench/make_inception_sized.py "$MODEL.tmp" 2>&1 | grep -v -i warn || true
  mv "$MODEL.tmp" "$MODEL"
fi

# The inputs, once per N: image i depends only on (seed, i), so a smaller N is a prefix.
DATA=$CACHE/n$N
if [ ! -f "$DATA/.ready" ]; then
  rm -rf "$DATA"
  mkdir -p "$DATA/png"
  "$PY" - "$DATA" "$N" <<'PYEOF'
import json, os, sys
import numpy as np
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
# Real photos of data/images (manifest: fully decodable, RGB, one frame, no alpha or EXIF
# rotation, at least 256 px on the short side).
skip = {"alpha", "exif_rotated", "grayscale", "avif_heif"}
photos = []
for line in open("data/images_manifest.jsonl"):
    r = json.loads(line)
    if (r["pillow_full_decode"] == "ok" and r["mode"] == "RGB" and r.get("n_frames", 1) == 1
            and min(r["width"], r["height"]) >= 256 and not skip & set(r["tags"])):
        im = Image.open(os.path.join("data", r["relpath"]))
        photos.append(im.convert("RGB"))
arr = np.lib.format.open_memmap(os.path.join(out, "arr_0.npy"), mode="w+", dtype=np.uint8,
                                shape=(n, 256, 256, 3))
for i in range(n):
    rng = np.random.default_rng([0, i])
    im = photos[rng.integers(len(photos))]
    w, h = im.size
    s = int(rng.integers(256, min(w, h) + 1))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    crop = im.crop((x, y, x + s, y + s)).resize((256, 256), Image.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    crop.save(os.path.join(out, "png", f"{i:06d}.png"))
    arr[i] = np.asarray(crop)
arr.flush()
del arr
# np.savez writes arr_0.npy stored (uncompressed), as ADM's sampling scripts do.
import zipfile
with zipfile.ZipFile(os.path.join(out, "batch.npz"), "w", zipfile.ZIP_STORED, allowZip64=True) as z:
    z.write(os.path.join(out, "arr_0.npy"), "arr_0.npy")
os.remove(os.path.join(out, "arr_0.npy"))
# Reference statistics (the evaluator's mu/sigma/mu_s/sigma_s; their values do not matter).
np.savez(os.path.join(out, "ref_stats.npz"), mu=np.zeros(2048), sigma=np.eye(2048),
         mu_s=np.zeros(17 * 17 * 7), sigma_s=np.eye(17 * 17 * 7))
print(f"{n} images from {len(photos)} photos", file=sys.stderr)
PYEOF
  touch "$DATA/.ready"
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build -q --profile "$PROFILE" -p llamagen-pipelines --bin llamagen
BUILT=$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/llamagen
# A copy of the binary: a rebuild of the shared target directory during the runs would swap it.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
BIN=$WORK/llamagen
cp "$BUILT" "$BIN"
# llamagen loads the ONNX Runtime library of .venv: the one the Python side imports.
export LLAMAGEN_PYTHON=$PWD/$PY

echo "machine: $(nproc) cores, $(uname -m); N=$N images 256x256, batch $BATCH, intra-op threads $THREADS, repeats $REPEATS; llamagen profile $PROFILE; model $MODEL"
"$PY" - "$BIN" "$PY" "$MODEL" "$DATA" "$N" "$BATCH" "$THREADS" "$REPEATS" <<'PYEOF'
import json, os, re, resource, statistics, subprocess, sys, tempfile, time
bin_, py, model, data, n, batch, threads, repeats = sys.argv[1:9]
n, repeats = int(n), int(repeats)
ref = os.path.join(data, "ref_stats.npz")
tmp = tempfile.mkdtemp()


def cpu_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd, marker=None):
    """Runs cmd; returns (wall s, cpu s, seconds until a stderr line matching marker, stdout)."""
    c0, t0 = cpu_children(), time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mark, err = None, []
    for line in p.stderr:
        err.append(line)
        if mark is None and marker and re.search(marker, line):
            mark = time.perf_counter() - t0
    out = p.stdout.read()
    if p.wait() != 0:
        sys.exit(f"{cmd[0]} failed:\n{''.join(err)}{out}")
    return time.perf_counter() - t0, cpu_children() - c0, mark, out


results = {}
for rep in range(repeats):
    for kind, sample in (("png", os.path.join(data, "png")), ("npz", os.path.join(data, "batch.npz"))):
        wall, cpu, act, out = run(
            [bin_, "eval", "--sample", sample, "--ref", ref, "--inception", model,
             "--batch-size", batch, "--intra-threads", threads, "--out", os.path.join(tmp, "l.json")],
            marker=r"^sample: \d+ images")
        ours = {"wall": wall, "cpu": cpu, "act": act, "fid": re.search(r"FID: (\S+)", out).group(1)}
        pj = os.path.join(tmp, "p.json")
        wall, cpu, _, out = run(
            [py, "bench/eval_reference.py", "--sample", sample, "--ref", ref, "--inception", model,
             "--batch-size", batch, "--intra-threads", threads, "--json", pj])
        t = json.load(open(pj))
        theirs = {"wall": wall, "cpu": cpu, "act": t["total_s"] - t["metrics_s"], **t,
                  "fid": re.search(r"FID: (\S+)", out).group(1)}
        results.setdefault(kind, []).append((ours, theirs))
        print(f"repeat {rep + 1} {kind}: llamagen {n / ours['wall']:.2f} images/s "
              f"(wall {ours['wall']:.1f}s, cpu {ours['cpu']:.1f}s, activations done at {ours['act']:.1f}s); "
              f"python {n / theirs['wall']:.2f} images/s (wall {theirs['wall']:.1f}s, cpu {theirs['cpu']:.1f}s: "
              f"session {t['open_s']:.1f}s, read+decode+float {t['read_s']:.1f}s, ORT run {t['infer_s']:.1f}s, "
              f"metrics {t['metrics_s']:.1f}s); ratio {theirs['wall'] / ours['wall']:.3f}x", flush=True)


def spread(xs, fmt="{:.2f}"):
    xs = sorted(xs)
    return f"min {fmt.format(xs[0])} / median {fmt.format(statistics.median(xs))} / max {fmt.format(xs[-1])}"


print()
for kind, rs in results.items():
    print(f"{kind} (N={n}, {len(rs)} repeats):")
    print(f"  llamagen images/s       {spread([n / o['wall'] for o, _ in rs])}")
    print(f"  python   images/s       {spread([n / t['wall'] for _, t in rs])}")
    print(f"  ratio llamagen/python   {spread([t['wall'] / o['wall'] for o, t in rs], '{:.3f}')}x (pair by pair)")
    print(f"  cpu s per image         llamagen {spread([o['cpu'] / n for o, _ in rs], '{:.4f}')}; "
          f"python {spread([t['cpu'] / n for _, t in rs], '{:.4f}')}")
    print(f"  cpu ratio python/llamagen {spread([t['cpu'] / o['cpu'] for o, t in rs], '{:.3f}')}x "
          f"(robust to other load on the machine: both use all cores)")
    print(f"  activations images/s    llamagen {spread([n / o['act'] for o, _ in rs])}; "
          f"python {spread([n / t['act'] for _, t in rs])}")
    print(f"  python ORT run only     {spread([n / t['infer_s'] for _, t in rs])} images/s "
          f"(the model's own throughput; share of python wall "
          f"{statistics.median([t['infer_s'] / t['wall'] for _, t in rs]):.0%})")
    print(f"  FID (random weights, same model; must agree): llamagen {rs[0][0]['fid']}, python {rs[0][1]['fid']}")
PYEOF
