#!/usr/bin/env python3
"""imagehash.phash over every file of a folder, as a user would run it.

Usage: dedup_reference.py pool|single DIR [--print]
  pool:   multiprocessing.Pool(os.cpu_count()).map over the files (pool start-up included)
  single: one process, a plain loop
Prints one JSON line like dedup/examples/phash_bench.rs: files, errors, wall_s, images_per_s,
and the XOR of all hashes (to check both sides hashed the same images the same way).
"""
import json
import multiprocessing
import os
import sys
import time

import imagehash
from PIL import Image


def hash_file(path):
    try:
        with Image.open(path) as im:
            return str(imagehash.phash(im))
    except Exception:  # noqa: BLE001 - counted as an error, like the Rust side
        return None


def main():
    mode, d = sys.argv[1], sys.argv[2]
    files = sorted(os.path.join(d, n) for n in os.listdir(d)
                   if not n.startswith(".") and os.path.isfile(os.path.join(d, n)))
    t = time.perf_counter()
    if mode == "pool":
        procs = os.cpu_count()
        with multiprocessing.Pool(procs) as pool:
            hashes = pool.map(hash_file, files)
    else:
        procs = 1
        hashes = [hash_file(f) for f in files]
    wall = time.perf_counter() - t
    if len(sys.argv) > 3 and sys.argv[3] == "--print":
        for f, h in zip(files, hashes):
            print(os.path.basename(f), h or "error")
    xor = 0
    for h in hashes:
        if h is not None:
            xor ^= int(h, 16)
    print(json.dumps({"files": len(files), "errors": sum(h is None for h in hashes), "processes": procs,
                      "wall_s": round(wall, 4), "images_per_s": round(len(files) / wall, 2),
                      "xor": f"{xor:016x}"}))


if __name__ == "__main__":
    main()
