"""PyTorch side of bench/vq_encode.sh: VQ-16 encode (encoder, quant_conv, L2-normalised nearest
codebook entry) of 256 px images with random weights of the real config (ch 128, ch_mult
[1, 1, 2, 2, 4], z 256, 16384 x 8 codebook), with the model written from the spec in
train/tests/fixtures/vq_train/make_reference.py."""

import argparse
import importlib.util
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "ref", os.path.join(HERE, "..", "train", "tests", "fixtures", "vq_train", "make_reference.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref.CH, ref.CH_MULT, ref.NUM_RES, ref.Z_CH = 128, [1, 1, 2, 2, 4], 2, 256
    ref.CODEBOOK_SIZE, ref.EMBED_DIM = 16384, 8
    vq = ref.VQModel().eval()
    x = torch.rand(a.batch, 3, a.image_size, a.image_size) * 2 - 1

    def encode():
        with torch.no_grad():
            h = vq.quant_conv(vq.encoder(x))
            return vq.quantize(h)

    encode()  # warm-up
    times, enc_times = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            h = vq.quant_conv(vq.encoder(x))
            t1 = time.perf_counter()
            vq.quantize(h)
        t2 = time.perf_counter()
        times.append(t2 - t0)
        enc_times.append(t1 - t0)
    best = min(times)
    print(json.dumps({"impl": "pytorch " + torch.__version__, "image_size": a.image_size,
                      "batch": a.batch, "threads": a.threads, "step_s": times,
                      "encoder_s": enc_times, "images_per_s": a.batch / best}))


if __name__ == "__main__":
    main()
