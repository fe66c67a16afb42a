"""PyTorch side of bench/vq_train_step.sh: one VQ GAN training step (generator forward, LPIPS,
discriminator, backward, clipping, Adam; then the discriminator step), timed, with the model of
train/tests/fixtures/vq_train/make_reference.py (written from the spec) in the benchmark
configuration: the reduced VQ (ch 32, ch_mult [1, 2, 2], z 16, 64 x 8 codebook), discriminator
ndf 64 / 3 layers, VGG16 widths, LPIPS dropout on, disc_start 0."""

import argparse
import importlib.util
import json
import os
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "ref", os.path.join(HERE, "..", "train", "tests", "fixtures", "vq_train", "make_reference.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref.CH, ref.CH_MULT, ref.Z_CH, ref.CODEBOOK_SIZE = 32, [1, 2, 2], 16, 64
    ref.NDF, ref.N_LAYERS, ref.VGG_WIDTHS = 64, 3, [64, 128, 256, 512, 512]
    vq, disc = ref.VQModel(), ref.NLayerDiscriminator()
    lp = ref.LPIPS(ref.make_vgg_features())
    for lin in lp.lins:  # the official heads: Dropout(0.5) then the 1x1 conv
        lin.model[0] = torch.nn.Dropout(0.5)
    lp.train()
    params = list(vq.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.95))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.rand(a.batch, 3, a.image_size, a.image_size) * 2 - 1

    def step():
        opt.zero_grad()
        rec, (vq_loss, commit, ent, _) = vq(x)
        loss = F.mse_loss(x, rec) + lp(x, rec).mean() + 0.5 * -disc(rec).mean() + vq_loss + commit + ent
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt_d.zero_grad()
        d = 0.5 * 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean())
        d.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
        opt_d.step()

    step()  # warm-up
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"impl": "pytorch " + torch.__version__, "image_size": a.image_size,
                      "batch": a.batch, "step_s": times}))


if __name__ == "__main__":
    main()
