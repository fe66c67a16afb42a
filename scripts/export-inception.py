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
"""
import argparse
import os
import sys
import urllib.request

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", help="the .onnx file to write (or to check, with --check)")
    p.add_argument("batch", nargs="?", help="with --check: an ADM .npz batch")
    p.add_argument("--check", action="store_true")
    p.add_argument("--cache", default="classify_image_graph_def.pb")
    a = p.parse_args()
    if a.check:
        check(a.out, a.batch, a.cache)
    else:
        export(a.out, a.cache)


if __name__ == "__main__":
    main()
