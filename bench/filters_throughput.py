#!/usr/bin/env python3
"""Python side of bench/filters_throughput.sh: the same scoring work with PIL preprocessing and
Python onnxruntime (filters/python/reference_pipeline.py), preprocessing on a thread pool of the
same size as the ONNX Runtime intra-op thread count (PIL releases the GIL while decoding and
resizing), batches of the same size, the same ONNX Runtime session options.

Usage: filters_throughput.py MODEL_DIR THREADS BATCH REPEAT FILE...   (prints one JSON line)
"""
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "filters", "python"))
from reference_pipeline import (  # noqa: E402
    CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ReferenceScorer, clip_crop, to_tensor, watermark_crop,
)
from PIL import Image  # noqa: E402
import io  # noqa: E402


def main():
    d, threads, batch, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    files = [open(f, "rb").read() for f in sys.argv[5:]]
    nsfw = os.path.join(d, "nsfw_head.onnx")
    aes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "filters", "assets", "laion-aesthetic",
                       "sac+logos+ava1-l14-linearMSE.pth")
    s = ReferenceScorer(
        clip_image=os.path.join(d, "clip_b32_image.onnx"), clip_text=os.path.join(d, "clip_b32_text.onnx"),
        l14=os.path.join(d, "clip_l14_image.onnx"), aesthetic_pth=aes,
        nsfw=nsfw if os.path.exists(nsfw) else None, watermark=os.path.join(d, "watermark.onnx"), threads=threads,
        # The session options of llamagen's scorer: workers that sleep rather than spin between
        # operators, which also keeps them off the cores PIL preprocesses on (faster here too).
        spinning=False,
    )
    caption = "a photo of a cat sitting on a wooden table, high quality"
    samples = [(f, caption) for _ in range(repeat) for f in files]
    pool = ThreadPoolExecutor(threads)

    def score_parallel(chunk):
        # Preprocess the chunk on the pool, then run the models (the ReferenceScorer's own loop
        # is reused with a pre-filled cache of preprocessed samples).
        t0 = time.perf_counter()
        prepared = list(pool.map(lambda x: s.preprocess(*x), chunk))
        t1 = time.perf_counter()
        it = iter(prepared)
        orig = s.preprocess
        s.preprocess = lambda d_, c: next(it)
        try:
            s.score(chunk)
        finally:
            s.preprocess = orig
        return t1 - t0

    score_parallel(samples[:batch])  # warm-up
    s.prep_s = s.infer_s = 0.0
    t0 = time.perf_counter()
    prep = 0.0
    n = 0
    for i in range(0, len(samples), batch):
        prep += score_parallel(samples[i : i + batch])
    wall = time.perf_counter() - t0

    t1 = time.perf_counter()
    sink = 0.0
    for f in files:
        img = Image.open(io.BytesIO(f))
        img.load()
        a = to_tensor(clip_crop(img), CLIP_MEAN, CLIP_STD)
        b = to_tensor(watermark_crop(img), IMAGENET_MEAN, IMAGENET_STD)
        sink += float(a[0, 0, 0] + b[0, 0, 0])
    single_ms = 1e3 * (time.perf_counter() - t1) / len(files)
    n = len(samples)
    print(json.dumps({
        "images": n, "wall_s": wall, "images_per_s": n / wall, "preprocess_wall_s": prep,
        "inference_wall_s": s.infer_s, "preprocess_ms_per_image_1thread": single_ms, "checksum": sink,
    }))


if __name__ == "__main__":
    main()
