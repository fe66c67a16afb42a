"""The scoring pipeline as LAION's Python tools run it: PIL decoding, torchvision-style transforms
written out with PIL + numpy (identical arithmetic, no torch needed), onnxruntime inference.

Used as the reference by filters/tests/pipeline/make_expected.py and as the competitor in
bench/filters_throughput.py. Needs Pillow, numpy, onnxruntime (and ftfy + regex for the tokenizer).

- CLIP (openai/CLIP `_transform`): Resize(n, BICUBIC) on the shorter side with the longer side
  int(n*long/short), CenterCrop(n) at int(round((h-n)/2)), convert("RGB"), ToTensor, Normalize.
- Watermark (LAION-5B-WatermarkDetection): convert("RGB"), Resize((256, 256)) (BILINEAR), ToTensor,
  Normalize(ImageNet).
- Similarity: cosine of L2-normalised image and text embeddings; aesthetic/NSFW heads on the
  L2-normalised ViT-L/14 embedding; pwatermark = softmax(logits)[:, index].
"""
import io
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "tokenizer"))

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32).reshape(3, 1, 1)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32).reshape(3, 1, 1)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def clip_crop(img, n=224):
    """Resize + CenterCrop + convert('RGB') of openai/CLIP's _transform, as uint8 HWC."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != n:
        new_short, new_long = n, int(n * long / short)
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        img = img.resize((nw, nh), Image.BICUBIC)
    w, h = img.size
    top = int(round((h - n) / 2.0))
    left = int(round((w - n) / 2.0))
    img = img.crop((left, top, left + n, top + n))
    return np.asarray(img.convert("RGB"))


def watermark_crop(img, n=256):
    return np.asarray(img.convert("RGB").resize((n, n), Image.BILINEAR))


def to_tensor(hwc, mean, std):
    x = hwc.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    return (x - mean) / std


def normalise(x):
    return x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True).astype(np.float32)


class Session:
    def __init__(self, path, threads, spinning=True):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.inp = self.s.get_inputs()[0]
        self.out = self.s.get_outputs()[0].name
        self.fixed = isinstance(self.inp.shape[0], int) and self.inp.shape[0] == 1

    def run(self, x):
        if "int32" in self.inp.type:
            x = x.astype(np.int32)
        if self.fixed:
            return np.concatenate([self.s.run([self.out], {self.inp.name: x[i : i + 1]})[0] for i in range(len(x))])
        return self.s.run([self.out], {self.inp.name: x})[0]


class ReferenceScorer:
    """clip_image/clip_text/l14/aesthetic_onnx/nsfw/watermark: ONNX paths or None;
    aesthetic_pth: a LAION .pth evaluated with numpy; spinning=False: ONNX Runtime's intra-op workers
    sleep instead of spinning between operators (llamagen's setting)."""

    def __init__(self, clip_image=None, clip_text=None, l14=None, aesthetic_pth=None, nsfw=None, watermark=None,
                 watermark_index=0, threads=0, spinning=True):
        self.ci = Session(clip_image, threads, spinning) if clip_image else None
        self.ct = Session(clip_text, threads, spinning) if clip_text else None
        self.l14 = Session(l14, threads, spinning) if l14 else None
        self.nsfw = Session(nsfw, threads, spinning) if nsfw else None
        self.wm = Session(watermark, threads, spinning) if watermark else None
        self.wi = watermark_index
        self.aes = None
        if aesthetic_pth:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "aesthetic"))
            from make_reference import load_state_dict

            sd = load_state_dict(aesthetic_pth)
            keys = sorted({k.rsplit(".", 1)[0] for k in sd}, key=lambda k: int(k.split(".")[1]) if "." in k else 0)
            self.aes = [(sd[k + ".weight"], sd[k + ".bias"]) for k in keys]
        self.tok = None
        if self.ct:
            from make_tokens import SimpleTokenizer, tokenize

            t = SimpleTokenizer()
            self.tok = lambda s: tokenize(t, s)
        self.prep_s = 0.0
        self.infer_s = 0.0

    def preprocess(self, data, caption):
        """Decode + transforms of one sample; None when the image does not decode."""
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:
            return None
        clip = to_tensor(clip_crop(img), CLIP_MEAN, CLIP_STD) if (self.ci or self.l14) else None
        wm = to_tensor(watermark_crop(img), IMAGENET_MEAN, IMAGENET_STD) if self.wm else None
        ids = None
        if self.tok and caption is not None:
            row = self.tok(caption)
            ids = np.zeros(77, dtype=np.int64)
            ids[: len(row)] = row
        return clip, wm, ids

    def score(self, samples):
        """samples: list of (image bytes, caption). Returns dict of lists (None = no score)."""
        t0 = time.perf_counter()
        prepared = [self.preprocess(d, c) for d, c in samples]
        t1 = time.perf_counter()
        n = len(samples)
        out = {k: [None] * n for k in ("clip_similarity", "aesthetic", "watermark", "nsfw")}
        ok = [i for i, p in enumerate(prepared) if p is not None]
        if ok:
            clip = np.stack([prepared[i][0] for i in ok]) if prepared[ok[0]][0] is not None else None
            if self.ci:
                ie = normalise(self.ci.run(clip))
                with_text = [(k, i) for k, i in enumerate(ok) if prepared[i][2] is not None]
                if with_text:
                    te = normalise(self.ct.run(np.stack([prepared[i][2] for _, i in with_text])))
                    for j, (k, i) in enumerate(with_text):
                        out["clip_similarity"][i] = float(np.dot(ie[k].astype(np.float64), te[j].astype(np.float64)))
            if self.l14:
                e = normalise(self.l14.run(clip))
                if self.aes:
                    x = e
                    for w, b in self.aes:
                        x = (x @ w.T + b).astype(np.float32)
                    for k, i in enumerate(ok):
                        out["aesthetic"][i] = float(x[k, 0])
                if self.nsfw:
                    p = self.nsfw.run(e)
                    for k, i in enumerate(ok):
                        out["nsfw"][i] = float(p[k, 0])
            if self.wm:
                logits = self.wm.run(np.stack([prepared[i][1] for i in ok])).astype(np.float64)
                ex = np.exp(logits - logits.max(axis=1, keepdims=True))
                p = ex[:, self.wi] / ex.sum(axis=1)
                for k, i in enumerate(ok):
                    out["watermark"][i] = float(p[k])
        t2 = time.perf_counter()
        self.prep_s += t1 - t0
        self.infer_s += t2 - t1
        return out
