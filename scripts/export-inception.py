#!/usr/bin/env python3
"""Converts the Inception-v3 graph of OpenAI's ADM evaluator (the one LlamaGen's
`evaluations/c2i/evaluator.py` downloads) to the ONNX model `llamagen eval --inception` runs.

Needs internet (the graph is downloaded once) and `pip install tensorflow tf2onnx onnx`; run it
on any machine with those, then copy the .onnx file:

    python scripts/export-inception.py inception_adm.onnx

The ONNX model's signature (checked by `llamagen eval` when it loads the model):
  input  `images`  float32 [N, H, W, 3], pixel values 0..255: what the evaluator feeds to the
                   graph's `ExpandDims:0` (its own bilinear resize to 299 and normalisation
                   follow inside the graph);
  output `pool_3`  float32 [N, 2048]          (`pool_3:0`, for FID and precision/recall);
  output `spatial` float32 [N, 17, 17, 7]     (`mixed_6/conv:0`, first 7 channels, for sFID);
  output `logits`  float32 [N, 1008]          (`pool_3` times the weights of
                   `softmax/logits/MatMul`, whose softmax the Inception Score uses).

This script has not been run where it was written (no internet or TensorFlow there), and the
tests use a stand-in with the same signature (eval/tests/fixtures/inception/make_standin.py).
After converting, always check the model against the evaluator's graph on a batch:
`python scripts/export-inception.py --check inception_adm.onnx batch.npz` prints the largest
differences between its outputs and TensorFlow's.

Second mode, `--clean`: clean-fid's Inception-v3 (the one LlamaGen's text-to-image evaluation,
`evaluations/t2i/evaluation.py`, gets through `cleanfid.fid.compute_fid(mode="clean")`), for
`llamagen eval t2i --inception-clean`. Needs internet once and `pip install torch onnx`:

    python scripts/export-inception.py --clean inception_clean.onnx
    python scripts/export-inception.py --clean --check inception_clean.onnx   # ONNX vs TorchScript

It loads clean-fid's TorchScript file `inception-2015-12-05.pt` (the StyleGAN2-ADA port of the
TensorFlow 2015-12-05 graph, downloaded from the URL clean-fid uses) and exports what
`cleanfid.inception_torchscript.InceptionV3W(resize_inside=False).forward` computes:
  input  `images`  float32 [N, 3, 299, 299], values 0..255, already resized to 299 (clean mode
                   resizes outside the network: per channel, PIL float bicubic, clipped);
  output `pool_3`  float32 [N, 2048]: `base.layers((x - 128) / 128)` viewed as [N, 2048].
The batch dimension is dynamic. The wrapper is scripted and exported with the TorchScript
exporter (`dynamo=False`); the export path was tried with a small scripted module of the same
layout (`layers` inside a ScriptModule), not with the real file. Not run where it was written (no internet or torch
there); the tests use a stand-in with the same signature
(eval/tests/fixtures/t2i/make_reference.py).
"""
import argparse
import os
import sys
import urllib.request

CLEAN_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"


def load_graph_def(path):
    import tensorflow.compat.v1 as tf

    if not os.path.exists(path):
        print(f"downloading {URL}", file=sys.stderr)
        urllib.request.urlretrieve(URL, path + ".tmp")
        os.rename(path + ".tmp", path)
    gd = tf.GraphDef()
    with open(path, "rb") as f:
        gd.ParseFromString(f.read())
    return gd


def replace_batchnorm(graph_def):
    """The graph with each `BatchNormWithGlobalNormalization` (an op of the 2015 graph that
    TensorFlow removed in GraphDef version 9 and tf2onnx does not convert) written out as
    `(x - mean) * rsqrt(var + eps) [* gamma] + beta`, under the node's own name."""
    import tensorflow.compat.v1 as tf

    out = tf.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for n in graph_def.node:
        if n.op != "BatchNormWithGlobalNormalization":
            out.node.append(n)
            continue
        x, mean, var, beta, gamma = n.input
        dtype = n.attr["T"]

        def op(name, kind, inputs):
            node = out.node.add()
            node.name, node.op = name, kind
            node.input.extend(inputs)
            node.attr["T"].CopyFrom(dtype)
            return name

        eps = out.node.add()
        eps.name, eps.op = n.name + "/eps", "Const"
        eps.attr["dtype"].type = dtype.type
        eps.attr["value"].tensor.CopyFrom(
            tf.make_tensor_proto(n.attr["variance_epsilon"].f, dtype=tf.float32)
        )
        factor = op(n.name + "/rsqrt", "Rsqrt", [op(n.name + "/var_eps", "Add", [var, eps.name])])
        if n.attr["scale_after_normalization"].b:
            factor = op(n.name + "/factor", "Mul", [factor, gamma])
        centred = op(n.name + "/centred", "Sub", [x, mean])
        op(n.name, "Add", [op(n.name + "/scaled", "Mul", [centred, factor]), beta])
    return out


def build(graph_def):
    """The evaluator's feature graph with named outputs, as a frozen GraphDef."""
    import tensorflow.compat.v1 as tf

    tf.disable_eager_execution()
    g = tf.Graph()
    with g.as_default():
        images = tf.placeholder(tf.float32, [None, None, None, 3], name="images")
        pool3, spatial, matmul = tf.import_graph_def(
            replace_batchnorm(graph_def),
            input_map={"ExpandDims:0": images},
            return_elements=["pool_3:0", "mixed_6/conv:0", "softmax/logits/MatMul"],
            name="inception",
        )
        pool = tf.reshape(pool3, [-1, 2048])
        tf.identity(pool, name="pool_3")
        tf.identity(spatial[..., :7], name="spatial")
        tf.identity(tf.matmul(pool, matmul.inputs[1]), name="logits")
    return g.as_graph_def()


def export(out, cache):
    import tf2onnx

    gd = build(load_graph_def(cache))
    tf2onnx.convert.from_graph_def(
        gd,
        input_names=["images:0"],
        output_names=["pool_3:0", "spatial:0", "logits:0"],
        opset=17,
        output_path=out,
    )
    # tf2onnx keeps TensorFlow's ":0" suffixes; rename to the signature above.
    import onnx

    m = onnx.load(out)
    rename = {"images:0": "images", "pool_3:0": "pool_3", "spatial:0": "spatial", "logits:0": "logits"}
    for v in list(m.graph.input) + list(m.graph.output):
        v.name = rename.get(v.name, v.name)
    for n in m.graph.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]
    onnx.checker.check_model(m)
    onnx.save(m, out)
    print(f"wrote {out}", file=sys.stderr)


def check(model, batch, cache):
    """Largest differences between the ONNX model and TensorFlow on the first 16 images."""
    import numpy as np
    import onnxruntime as ort
    import tensorflow.compat.v1 as tf

    x = np.load(batch)["arr_0"][:16].astype(np.float32)
    gd = build(load_graph_def(cache))
    with tf.Session(graph=tf.Graph()) as s:
        tf.import_graph_def(gd, name="")
        want = s.run(["pool_3:0", "spatial:0", "logits:0"], {"images:0": x})
    got = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        ["pool_3", "spatial", "logits"], {"images": x}
    )
    for name, g, w in zip(["pool_3", "spatial", "logits"], got, want):
        print(f"{name}: max |onnx - tf| = {np.abs(g - w).max():.3g} (max |tf| = {np.abs(w).max():.3g})")


def clean_module(cache):
    """clean-fid's `InceptionV3W(resize_inside=False)` as a plain module on the CPU."""
    import torch

    if not os.path.exists(cache):
        print(f"downloading {CLEAN_URL}", file=sys.stderr)
        urllib.request.urlretrieve(CLEAN_URL, cache + ".tmp")
        os.rename(cache + ".tmp", cache)
    base = torch.jit.load(cache, map_location="cpu").eval()

    class CleanInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # The whole ScriptModule is registered (tracing refuses a child taken out of it).
            self.base = base

        def forward(self, images):
            # As InceptionV3W.forward: x1 = x - 128; x2 = x1 / 128; layers(x2).view((bs, 2048)).
            x1 = images - 128
            x2 = x1 / 128
            return self.base.layers(x2).reshape(-1, 2048)

    return CleanInception().eval()


def export_clean(out, cache):
    import onnx
    import torch

    # Scripted, so the exporter takes the graph as it is (tracing refuses to call into the
    # loaded ScriptModule's children).
    m = torch.jit.script(clean_module(cache))
    with torch.no_grad():
        torch.onnx.export(
            m,
            (torch.zeros(2, 3, 299, 299),),
            out,
            dynamo=False,
            input_names=["images"],
            output_names=["pool_3"],
            dynamic_axes={"images": {0: "N"}, "pool_3": {0: "N"}},
            opset_version=17,
        )
    onnx.checker.check_model(onnx.load(out))
    print(f"wrote {out}", file=sys.stderr)


def check_clean(model, cache):
    """Largest difference between the ONNX model and the TorchScript module on 4 random
    0..255 inputs (and a batch of 1, for the dynamic batch)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(0).uniform(0, 255, (4, 3, 299, 299)).astype(np.float32)
    with torch.no_grad():
        want = clean_module(cache)(torch.from_numpy(x)).numpy()
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    got = s.run(["pool_3"], {"images": x})[0]
    one = s.run(["pool_3"], {"images": x[:1]})[0]
    print(f"pool_3: shape {got.shape}, max |onnx - torch| = {np.abs(got - want).max():.3g} "
          f"(max |torch| = {np.abs(want).max():.3g}); batch of 1: {np.abs(one - want[:1]).max():.3g}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", help="the .onnx file to write (or to check, with --check)")
    p.add_argument("batch", nargs="?", help="with --check (ADM mode): an ADM .npz batch")
    p.add_argument("--check", action="store_true")
    p.add_argument("--clean", action="store_true", help="clean-fid's Inception (llamagen eval t2i)")
    p.add_argument(
        "--cache",
        help="the downloaded model (default classify_image_graph_def.pb, or "
        "inception-2015-12-05.pt with --clean)",
    )
    a = p.parse_args()
    if a.clean:
        cache = a.cache or "inception-2015-12-05.pt"
        if a.check:
            check_clean(a.out, cache)
        else:
            export_clean(a.out, cache)
    elif a.check:
        check(a.out, a.batch, a.cache or "classify_image_graph_def.pb")
    else:
        export(a.out, a.cache or "classify_image_graph_def.pb")


if __name__ == "__main__":
    main()
