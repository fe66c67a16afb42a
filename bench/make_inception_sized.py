#!/usr/bin/env python3
"""Writes an ONNX model with the signature of the evaluator's Inception (eval/src/inception.rs,
scripts/export-inception.py) and the real Inception-v3 architecture and size, for the throughput
benchmark bench/eval.sh.

    python bench/make_inception_sized.py OUT.onnx

Needs torch (2.9.1, .venv-torch) and torchvision 0.24.1 (bench/requirements-eval-model.txt).

**The weights are random** (torchvision's own initialisation, `init_weights=True`): the real
weights are those of the graph OpenAI's ADM evaluator downloads (`classify_image_graph_def.pb`),
which cannot be fetched where this benchmark is run; `scripts/export-inception.py` converts that
graph with TensorFlow and tf2onnx wherever it can be downloaded. The activations of this model
mean nothing; what it is for is the cost of running the evaluator's network: the same layers,
shapes and ~5.7 GFLOPs per 299-pixel image, so that a throughput measured with it is the
throughput the real model gets (same ops: convolutions, batch norms folded by ONNX Runtime,
poolings, one resize).

The graph, in the order of ADM's:
  `images` float32 [N, H, W, 3], 0..255 (what the evaluator feeds to `ExpandDims:0`)
  -> NCHW, bilinear resize to 299x299 (F.interpolate, align_corners=False; TensorFlow's
     ResizeBilinear of the 2015 graph uses the asymmetric mapping: the values differ slightly,
     the cost is the same)
  -> (x - 128) / 128 (the graph's Sub/Mul)
  -> torchvision's Inception-v3 trunk (Conv2d_1a_3x3 ... Mixed_7c; transform_input=False)
  -> `pool_3` float32 [N, 2048]: the global average pool (the graph's `pool_3:0`);
  -> `spatial` float32 [N, 17, 17, 7]: the first 7 channels of the 1x1 branch of Mixed_6d,
     in NHWC order. ADM's `mixed_6/conv:0` is that tensor: the 2015 graph's blocks `mixed`,
     `mixed_1`, `mixed_2` are torchvision's Mixed_5b/5c/5d, `mixed_3` is Mixed_6a (35->17),
     `mixed_4`..`mixed_7` are Mixed_6b..6e, so `mixed_6` is Mixed_6d, and its `conv` the
     first branch (1x1 conv + batch norm + ReLU, 192 channels at 17x17);
  -> `logits` float32 [N, 1008]: pool_3 times a 2048x1008 matrix (`softmax/logits/MatMul`).

Batch norms: the random network's activations would grow or vanish layer by layer (and
denormal floats are slow on CPUs, which would distort a throughput measurement), so each batch
norm's running statistics are set from one batch of random images before export: every layer
then sees activations of unit scale, as in a trained network.

Exported with the TorchScript exporter (dynamo=False), opset 17, dynamic batch, height and
width.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torchvision.models import inception_v3


class EvaluatorInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = inception_v3(
            weights=None, aux_logits=False, init_weights=True, transform_input=False
        )
        self.logits = torch.nn.Linear(2048, 1008, bias=False)

    def trunk(self, x):
        n = self.net
        x = n.Conv2d_1a_3x3(x)
        x = n.Conv2d_2a_3x3(x)
        x = n.Conv2d_2b_3x3(x)
        x = n.maxpool1(x)
        x = n.Conv2d_3b_1x1(x)
        x = n.Conv2d_4a_3x3(x)
        x = n.maxpool2(x)
        x = n.Mixed_5b(x)
        x = n.Mixed_5c(x)
        x = n.Mixed_5d(x)
        x = n.Mixed_6a(x)
        x = n.Mixed_6b(x)
        x = n.Mixed_6c(x)
        # Mixed_6d through its branches (InceptionC._forward), keeping the 1x1 branch: ADM's
        # mixed_6/conv.
        branches = n.Mixed_6d._forward(x)
        spatial = branches[0]
        x = torch.cat(branches, 1)
        x = n.Mixed_6e(x)
        x = n.Mixed_7a(x)
        x = n.Mixed_7b(x)
        x = n.Mixed_7c(x)
        pool = n.avgpool(x).flatten(1)
        return pool, spatial

    def forward(self, images):
        x = images.permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        pool, spatial = self.trunk(x)
        spatial = spatial[:, :7].permute(0, 2, 3, 1)
        return pool, spatial, self.logits(pool)


def calibrate_batchnorm(model, seed):
    """Sets every batch norm's running mean and variance to those of one random batch."""
    g = torch.Generator().manual_seed(seed)
    # Smooth random images: noise upsampled, so that the statistics resemble a photo's more than
    # white noise does.
    low = torch.rand(16, 3, 32, 32, generator=g) * 255.0
    images = F.interpolate(low, size=(256, 256), mode="bilinear").permute(0, 2, 3, 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="ONNX file to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = EvaluatorInception()
    calibrate_batchnorm(model, args.seed)
    example = torch.zeros(2, 256, 256, 3)
    with torch.no_grad():
        pool, spatial, logits = model(example + 100.0)
        print(
            f"pool_3 {tuple(pool.shape)} mean |x| {pool.abs().mean():.3g}; "
            f"spatial {tuple(spatial.shape)}; logits {tuple(logits.shape)}",
            file=sys.stderr,
        )
        torch.onnx.export(
            model,
            (example,),
            args.out,
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["pool_3", "spatial", "logits"],
            dynamic_axes={
                "images": {0: "n", 1: "height", 2: "width"},
                "pool_3": {0: "n"},
                "spatial": {0: "n"},
                "logits": {0: "n"},
            },
        )
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {params / 1e6:.1f} M parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
