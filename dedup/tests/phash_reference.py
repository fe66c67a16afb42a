#!/usr/bin/env python3
"""Reference pHashes of every bundled real image, from PyPI's ImageHash (the fixtures of tests/phash.rs).

Run with a scratch venv:
    python3 -m venv /tmp/dv && /tmp/dv/bin/pip install Pillow==13.0.0 numpy==2.3.5 scipy ImageHash
    /tmp/dv/bin/python dedup/tests/phash_reference.py

Writes dedup/tests/fixtures/phash_expected.json: one entry per file under data/ with an image
extension, {"path", "format", "mode", "size", "phash"} (or "error": the exception PIL/imagehash
raised), where phash is str(imagehash.phash(Image.open(path))), exactly as a user calls it.

For every lossy file (JPEG, MPO, lossy WebP) it also writes PIL's decoded pixels converted to
mode L, losslessly, as dedup/tests/fixtures/decoded/<n>.png, with the hash of that PNG (which is
the hash of the original: phash converts to L first). Rust must match those exactly: any
difference on the original file is then the decoder's (zune-jpeg / image-webp vs
libjpeg-turbo / libwebp), not the hash's.
"""
import json
import os
import sys
import warnings

import imagehash
import numpy
import PIL
import scipy
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA = os.path.join(ROOT, "data")
FIX = os.path.join(ROOT, "dedup", "tests", "fixtures")
EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heif", ".mpo")
Image.MAX_IMAGE_PIXELS = None
warnings.simplefilter("ignore")


def main():
    os.makedirs(os.path.join(FIX, "decoded"), exist_ok=True)
    files = []
    for d, _, names in os.walk(DATA):
        for n in names:
            if n.lower().endswith(EXTS):
                files.append(os.path.relpath(os.path.join(d, n), ROOT))
    files.sort()
    out = []
    for i, rel in enumerate(files):
        e = {"path": rel}
        try:
            im = Image.open(os.path.join(ROOT, rel))
            e.update(format=im.format, mode=im.mode, size=list(im.size))
            e["phash"] = str(imagehash.phash(im))
        except Exception as ex:  # noqa: BLE001 - recorded, the Rust side must refuse it too
            e["error"] = f"{type(ex).__name__}: {ex}"
            out.append(e)
            continue
        lossy = im.format in ("JPEG", "MPO") or (im.format == "WEBP" and not _webp_lossless(rel))
        if lossy:
            name = f"decoded/{i:03d}.png"
            Image.open(os.path.join(ROOT, rel)).convert("L").save(os.path.join(FIX, name), optimize=True)
            e["decoded_l_png"] = name
            e["decoded_l_png_phash"] = str(imagehash.phash(Image.open(os.path.join(FIX, name))))
            assert e["decoded_l_png_phash"] == e["phash"], rel
        out.append(e)
    doc = {
        "versions": {"Pillow": PIL.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
                     "ImageHash": getattr(imagehash, "__version__", "?")},
        "call": "str(imagehash.phash(PIL.Image.open(path)))",
        "images": out,
    }
    with open(os.path.join(FIX, "phash_expected.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    ok = sum("phash" in e for e in out)
    print(f"{len(out)} files, {ok} hashed, {len(out) - ok} refused by PIL/imagehash", file=sys.stderr)


def _webp_lossless(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        head = f.read(16)
    return head[12:16] == b"VP8L"


if __name__ == "__main__":
    main()
