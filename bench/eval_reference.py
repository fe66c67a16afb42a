#!/usr/bin/env python3
"""The Python evaluator path that bench/eval.sh times against `llamagen eval`: the flow of
OpenAI's ADM evaluator (`evaluations/evaluator.py`, which LlamaGen's
`evaluations/c2i/evaluator.py` copies) with its TensorFlow session replaced by Python
onnxruntime on the same ONNX Inception model `llamagen eval --inception` runs.

    python bench/eval_reference.py --sample S --ref R.npz --inception M.onnx [--batch-size 64]
        [--intra-threads 0] [--json OUT.json]

What it does, as a user would run it:
- the sample batch is an ADM `.npz` (`arr_0` uint8 N x H x W x 3), read as the evaluator reads
  it: the `arr_0.npy` member of the zip streamed batch by batch (`open_npz_array`,
  `StreamingNpzArrayReader`), or a folder of images, each opened with
  `PIL.Image.open(f).convert("RGB")` and turned into an array, batch by batch, sorted by name;
- each batch of 64 is `batch.astype(np.float32)` and one `session.run` (the evaluator's
  `compute_activations`); pool and spatial features are reshaped to [n, -1] and concatenated;
- the session: onnxruntime's recommended defaults (graph optimisation ORT_ENABLE_ALL, the CPU
  provider, intra-op threads = cores unless --intra-threads is given);
- statistics as the evaluator: mean and `np.cov(rowvar=False)` of pool and spatial features, the
  softmax of the logits (float32, in batches of 512 as `compute_inception_score`), the Inception
  Score over groups of 5000; FID and sFID against the reference statistics (`mu`, `sigma`,
  `mu_s`, `sigma_s` of R.npz). The trace of the matrix root is taken from the eigenvalues of the
  symmetric S1^1/2 S2 S1^1/2 as llamagen does (numpy `eigh`), which is faster than the
  evaluator's `scipy.linalg.sqrtm`: the Python side is not made slower than it could run.

Prints the metrics as the evaluator does and, with --json, the timings of each phase: open
(session), read (reading/decoding the batch and the float conversion), infer (`session.run`),
metrics (statistics, IS, FID, sFID), total (from the start of main).
"""
import argparse
import json
import os
import time
import zipfile

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --- Reading batches, as the evaluator (open_npz_array / StreamingNpzArrayReader) ---------------


def _read_bytes(fp, size):
    data = bytes()
    while len(data) < size:
        r = fp.read(size - len(data))
        if not r:
            break
        data += r
    if len(data) != size:
        raise ValueError(f"EOF: expected {size} bytes, got {len(data)}")
    return data


def npz_batches(path, batch_size):
    """Batches of `arr_0`, streamed from the zip member as the evaluator reads them."""
    with open(path, "rb") as f, zipfile.ZipFile(f, "r") as zf:
        with zf.open("arr_0.npy", "r") as arr_f:
            version = np.lib.format.read_magic(arr_f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(arr_f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(arr_f)
            assert not fortran and not dtype.hasobject
            idx = 0
            while idx < shape[0]:
                bs = min(batch_size, shape[0] - idx)
                idx += bs
                count = bs * int(np.prod(shape[1:]))
                data = _read_bytes(arr_f, count * dtype.itemsize)
                yield np.frombuffer(data, dtype=dtype).reshape([bs, *shape[1:]])


def folder_batches(path, batch_size):
    """Batches of the folder's images (sorted by name), each opened with PIL as RGB."""
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
    from PIL import Image

    for i in range(0, len(files), batch_size):
        yield np.stack(
            [
                np.array(Image.open(os.path.join(path, f)).convert("RGB"))
                for f in files[i : i + batch_size]
            ]
        )


# --- Metrics, as the evaluator ------------------------------------------------------------------


def statistics(acts):
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    # tr(sqrtm(S1 S2)) as the sum of the roots of the eigenvalues of S1^1/2 S2 S1^1/2.
    w, u = np.linalg.eigh(sigma1)
    root1 = (u * np.sqrt(np.maximum(w, 0))) @ u.T
    m = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.maximum(ev, 0)).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def softmax(logits, batch=512):
    out = []
    for i in range(0, len(logits), batch):
        x = logits[i : i + batch]
        e = np.exp(x - x.max(axis=1, keepdims=True))
        out.append(e / e.sum(axis=1, keepdims=True))
    return np.concatenate(out, axis=0)


def inception_score(preds, split_size=5000):
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(np.nan_to_num(kl), 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", required=True, help="ADM .npz batch or folder of images")
    ap.add_argument("--ref", required=True, help=".npz with mu, sigma, mu_s, sigma_s")
    ap.add_argument("--inception", required=True, help="ONNX model")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--intra-threads", type=int, default=0, help="0: onnxruntime's default")
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args()

    t = {}
    start = time.perf_counter()
    opts = ort.SessionOptions()  # graph_optimization_level ORT_ENABLE_ALL by default
    if args.intra_threads > 0:
        opts.intra_op_num_threads = args.intra_threads
    sess = ort.InferenceSession(args.inception, opts, providers=["CPUExecutionProvider"])
    t["open_s"] = time.perf_counter() - start

    batches = (
        folder_batches(args.sample, args.batch_size)
        if os.path.isdir(args.sample)
        else npz_batches(args.sample, args.batch_size)
    )
    pools, spatials, logits = [], [], []
    read_s = infer_s = 0.0
    it = iter(batches)
    while True:
        t1 = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            read_s += time.perf_counter() - t1
            break
        batch = batch.astype(np.float32)
        t2 = time.perf_counter()
        pool, spatial, logit = sess.run(["pool_3", "spatial", "logits"], {"images": batch})
        t3 = time.perf_counter()
        pools.append(pool.reshape([pool.shape[0], -1]))
        spatials.append(spatial.reshape([spatial.shape[0], -1]))
        logits.append(logit)
        read_s += t2 - t1
        infer_s += t3 - t2
    t["read_s"], t["infer_s"] = read_s, infer_s
    t4 = time.perf_counter()
    pool, spatial = np.concatenate(pools), np.concatenate(spatials)
    probs = softmax(np.concatenate(logits))
    ref = np.load(args.ref)
    mu, sigma = statistics(pool)
    mu_s, sigma_s = statistics(spatial)
    metrics = {
        "inception_score": inception_score(probs),
        "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        "sfid": frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"]),
    }
    t["metrics_s"] = time.perf_counter() - t4
    t["total_s"] = time.perf_counter() - T0
    t["images"] = len(pool)
    print("Inception Score:", metrics["inception_score"])
    print("FID:", metrics["fid"])
    print("sFID:", metrics["sfid"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**t, **metrics}, f)


if __name__ == "__main__":
    main()
