#!/usr/bin/env python3
"""Expected preprocessing and scores of the real images in data/images/ with the stand-in models,
computed by the Python reference pipeline (filters/python/reference_pipeline.py: PIL + numpy +
onnxruntime, the way LAION's tools compute them).

For each image: whether PIL decodes it, SHA-256 of the uint8 CLIP 224 crop and of the uint8
watermark 256 squash (before float conversion), and the four scores with the caption below.

Run: .venv/bin/pip install -r requirements-bench.txt && .venv/bin/python filters/tests/pipeline/make_expected.py
Writes filters/tests/pipeline/expected.json.
"""
import hashlib
import io
import json
import os
import sys

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "filters", "python"))
from reference_pipeline import ReferenceScorer, clip_crop, watermark_crop  # noqa: E402

MODELS = os.path.join(ROOT, "filters", "tests", "models")
CAPTION = "a photo of a cat sitting on a wooden table"


def main():
    scorer = ReferenceScorer(
        clip_image=os.path.join(MODELS, "clip_b32_image.onnx"),
        clip_text=os.path.join(MODELS, "clip_b32_text.onnx"),
        l14=os.path.join(MODELS, "clip_l14_image.onnx"),
        aesthetic_pth=os.path.join(ROOT, "filters", "assets", "laion-aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
        nsfw=os.path.join(MODELS, "nsfw_head.onnx"),
        watermark=os.path.join(MODELS, "watermark.onnx"),
    )
    images = sorted(os.listdir(os.path.join(ROOT, "data", "images")))
    out = {"generator": "filters/tests/pipeline/make_expected.py", "caption": CAPTION, "images": {}}
    for name in images:
        data = open(os.path.join(ROOT, "data", "images", name), "rb").read()
        rec = {"pil_decodes": False}
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            rec["pil_decodes"] = True
            rec["mode"] = img.mode
            rec["size"] = list(img.size)
            rec["clip224_sha256"] = hashlib.sha256(clip_crop(img).tobytes()).hexdigest()
            rec["wm256_sha256"] = hashlib.sha256(watermark_crop(img).tobytes()).hexdigest()
        except Exception as e:  # broken inputs are part of the set
            rec["error"] = type(e).__name__
        s = scorer.score([(data, CAPTION)])
        rec["scores"] = {k: v[0] for k, v in s.items()}
        out["images"][name] = rec
        print(name, rec.get("mode"), rec["scores"])
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
