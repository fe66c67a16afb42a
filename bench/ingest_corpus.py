"""Generates the web-like corpus and URL list of bench/ingest_img2dataset.sh.

Usage: ingest_corpus.py WWW_DIR LIST.parquet BASE_URL N [SEED]

Images: N distinct pictures made from the bundled real photos (data/images) by a random crop,
rescale to a long side of 300-1600 px (web-like sizes), colour jitter and a little noise, so
every file has distinct content; about 88% JPEG (quality 75-95, some progressive), 10% PNG and
2% WebP. The list is Parquet with LAION's URL and TEXT columns; a fault row's TEXT is
`fault <kind> <row>`, so outcomes can be counted per kind.

BASE_URL may be several base URLs separated by commas (several hosts): good images are spread
over them. Faults, FAULT_SHARE of the rows (environment, default 0.04):
- without FAULT_BASE (environment): missing files (404), corrupt bytes, HTML at an image URL;
- with FAULT_BASE, the base URL of bench/fault_server.py, and REFUSED_BASE, a base URL where
  nothing listens, the web's mix in equal parts: 404, 403, 500, HTML, corrupt bytes, refused
  connections, resets, truncated bodies, headers that never come, bodies dripping for 6 s.
(OpenCV, which img2dataset decodes with, accepts a JPEG cut short and fills the rest with grey,
where llamagen records it as failed: truncated bodies can count differently by design.)
"""

import os
import random
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

www, list_path, n = sys.argv[1], sys.argv[2], int(sys.argv[4])
bases = [b.rstrip("/") for b in sys.argv[3].split(",")]
fault_base = os.environ.get("FAULT_BASE", "").rstrip("/")
refused_base = os.environ.get("REFUSED_BASE", "").rstrip("/")
fault_share = float(os.environ.get("FAULT_SHARE", "0.04"))
if fault_base:
    kinds = ["missing", "http_403", "http_500", "html", "corrupt", "refused", "reset",
             "truncated", "no_headers", "drip"]
else:
    kinds = ["missing", "corrupt", "html"]
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
rng = random.Random(seed)
nrng = np.random.default_rng(seed)
os.makedirs(www, exist_ok=True)

src_dir = "data/images"
sources = []
for name in sorted(os.listdir(src_dir)):
    p = os.path.join(src_dir, name)
    if not os.path.isfile(p):
        continue
    try:
        im = Image.open(p)
        im.load()
        im = im.convert("RGB")
    except Exception:
        continue
    if min(im.size) >= 200:
        sources.append(im)
assert sources, "no source photos"

urls, texts = [], []
faults = 0
def picture(i: int, name: str) -> str:
    """Writes one generated picture; returns its file name."""
    src = sources[rng.randrange(len(sources))]
    w, h = src.size
    cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = src.crop((x, y, x + cw, y + ch))
    long_side = rng.randint(300, 1600)
    aspect = rng.uniform(0.6, 1.8)
    if aspect >= 1:
        size = (long_side, max(64, int(long_side / aspect)))
    else:
        size = (max(64, int(long_side * aspect)), long_side)
    im = im.resize(size, Image.BILINEAR)
    a = np.asarray(im, dtype=np.float32)
    a = a * nrng.uniform(0.8, 1.2, size=3) + nrng.normal(0, 4, size=a.shape)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    r = rng.random()
    if r < 0.88:
        ext = "jpg"
        im.save(os.path.join(www, f"{name}.jpg"), "JPEG", quality=rng.randint(75, 95),
                progressive=rng.random() < 0.15)
    elif r < 0.98:
        ext = "png"
        im.save(os.path.join(www, f"{name}.png"), "PNG")
    else:
        ext = "webp"
        im.save(os.path.join(www, f"{name}.webp"), "WEBP", quality=85)
    return f"{name}.{ext}"


for i in range(n):
    name = f"{i:06d}"
    base = bases[i % len(bases)]
    r = rng.random()
    if r < fault_share:
        faults += 1
        kind = rng.choice(kinds)
        if kind in ("http_403", "http_500"):
            urls.append(f"{fault_base}/status/{kind[5:]}?{name}")
        elif kind == "refused":
            urls.append(f"{refused_base}/{name}.jpg")
        elif kind == "reset":
            urls.append(f"{fault_base}/reset?{name}")
        elif kind == "no_headers":
            urls.append(f"{fault_base}/hang?{name}")
        elif kind in ("truncated", "drip"):
            urls.append(f"{fault_base}/{kind}/{picture(i, name)}")
        elif kind == "missing":
            urls.append(f"{base}/missing/{name}.jpg")
        elif kind == "corrupt":
            with open(os.path.join(www, name + ".jpg"), "wb") as f:
                f.write(bytes(rng.getrandbits(8) for _ in range(5000)))
            urls.append(f"{base}/{name}.jpg")
        else:
            with open(os.path.join(www, name + ".html"), "w") as f:
                f.write("<!doctype html><html><body>Not an image</body></html>")
            urls.append(f"{base}/{name}.html")
        texts.append(f"fault {kind} {i}")
        continue
    urls.append(f"{base}/{picture(i, name)}")
    texts.append(f"a photo, variant {i}")

pq.write_table(pa.table({"URL": urls, "TEXT": texts}), list_path)
print(f"{n} rows, {faults} faults, in {www}")
