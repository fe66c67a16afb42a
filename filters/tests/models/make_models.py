#!/usr/bin/env python3
"""Builds the stand-in ONNX models the filter tests load, and their reference outputs.

The stand-ins have the signatures of the real exports (see filters/README section of the project
README and scripts/export_filter_models.py) but tiny, deterministic weights, so tests run offline:

| file                          | input                                  | output                          |
|-------------------------------|----------------------------------------|---------------------------------|
| clip_b32_image.onnx           | pixel_values f32 [N,3,224,224]         | image_embeds f32 [N,512]        |
| clip_b32_text.onnx            | input_ids i64 [N,77]                   | text_embeds f32 [N,512]         |
| clip_l14_image.onnx           | pixel_values f32 [N,3,224,224]         | image_embeds f32 [N,768]        |
| clip_b32_image_fixed1.onnx    | image f32 [1,3,224,224]                | embedding f32 [1,512] (unit)    |
| clip_b32_text_i32_fixed1.onnx | text i32 [1,77]                        | embedding f32 [1,512] (unit)    |
| watermark.onnx                | pixel_values f32 [N,3,256,256]         | logits f32 [N,2]                |
| aesthetic_head.onnx           | embedding f32 [N,768]                  | score f32 [N,1]                 |
| nsfw_head.onnx                | embedding f32 [N,768]                  | score f32 [N,1] (sigmoid)       |

The fixed-batch, int32, normalised variants follow the immich/open_clip export style; they compute
the same embeddings as the dynamic ones (up to normalisation), so tests can check that both
styles give the same cosine.

The text stand-in pools at the position of the largest token id (the first end-of-text token),
as CLIP's text transformer does, after a cumulative sum over positions, so every token before the
end token matters and padding after it does not.

Reference outputs: for inputs defined by closed formulas (see `pixel_input`, `token_input`,
`embedding_input`; the Rust tests rebuild them), the outputs of Python onnxruntime are written to
reference_outputs.json.

Run: .venv/bin/python filters/tests/models/make_models.py   (needs onnx, onnxruntime, numpy)
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 17


def weights(shape, seed):
    """Deterministic weights in [-1, 1]: sin of a linear index (no RNG, so any numpy gives them)."""
    n = int(np.prod(shape))
    idx = np.arange(n, dtype=np.float64)
    return (np.sin(idx * 0.7071 + seed * 1.3) * np.cos(idx * 0.013 + seed)).astype(np.float32).reshape(shape)


def save(model, name):
    model.opset_import[0].version = OPSET
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(HERE, name))


def image_encoder(name, in_name, out_name, size, dim, batch, normalise, seed):
    """AveragePool to a coarse grid, flatten, affine map, tanh mixing, second affine map."""
    pool = 32
    grid = size // pool
    feat = 3 * grid * grid
    hidden = 96
    w1 = numpy_helper.from_array(weights((feat, hidden), seed) * 0.5, "w1")
    b1 = numpy_helper.from_array(weights((hidden,), seed + 1) * 0.1, "b1")
    w2 = numpy_helper.from_array(weights((hidden, dim), seed + 2), "w2")
    b2 = numpy_helper.from_array(weights((dim,), seed + 3) * 0.2, "b2")
    shape = numpy_helper.from_array(np.array([0, feat], dtype=np.int64), "flat_shape")
    nodes = [
        helper.make_node("AveragePool", [in_name], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["raw" if normalise else out_name]),
    ]
    if normalise:
        nodes += l2_normalise("raw", out_name)
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, dim])],
        [w1, b1, w2, b2, shape],
    )
    return helper.make_model(graph)


def l2_normalise(x, out):
    # ReduceL2 takes `axes` as an attribute up to opset 17.
    return [
        helper.make_node("ReduceL2", [x], [x + "_norm"], axes=[1], keepdims=1),
        helper.make_node("Div", [x, x + "_norm"], [out]),
    ]


def text_encoder(name, in_name, out_name, int_type, dim, batch, normalise, seed):
    """Token ids -> hashed embedding table -> cumulative sum over positions -> pooled at the
    argmax token position -> affine map."""
    table_rows, width = 1009, 64
    table = numpy_helper.from_array(weights((table_rows, width), seed), "table")
    pos = numpy_helper.from_array(weights((77, width), seed + 5) * 0.1, "pos")
    proj = numpy_helper.from_array(weights((width, dim), seed + 7), "proj")
    modulus = numpy_helper.from_array(np.array(table_rows, dtype=np.int64), "modulus")
    axis1 = numpy_helper.from_array(np.array(1, dtype=np.int64), "axis1")
    depth = numpy_helper.from_array(np.array(77, dtype=np.int64), "depth")
    onehot_values = numpy_helper.from_array(np.array([0.0, 1.0], dtype=np.float32), "onehot_values")
    ids = in_name
    nodes = []
    if int_type == TensorProto.INT32:
        nodes.append(helper.make_node("Cast", [in_name], ["ids64"], to=TensorProto.INT64))
        ids = "ids64"
    nodes += [
        helper.make_node("Mod", [ids, "modulus"], ["rows"]),
        helper.make_node("Gather", ["table", "rows"], ["emb"], axis=0),
        helper.make_node("Add", ["emb", "pos"], ["emb_pos"]),
        helper.make_node("CumSum", ["emb_pos", "axis1"], ["ctx"]),
        helper.make_node("ArgMax", [ids], ["eot"], axis=1, keepdims=0),
        helper.make_node("OneHot", ["eot", "depth", "onehot_values"], ["sel"], axis=-1),
        helper.make_node("Unsqueeze", ["sel", "axis_last"], ["sel3"]),
        helper.make_node("Mul", ["ctx", "sel3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes_seq"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "proj"], ["raw" if normalise else out_name]),
    ]
    if normalise:
        nodes += l2_normalise("raw", out_name)
    inits = [
        table,
        pos,
        proj,
        modulus,
        axis1,
        depth,
        onehot_values,
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis_last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes_seq"),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(in_name, int_type, [batch, 77])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, dim])],
        inits,
    )
    return helper.make_model(graph)


def watermark(seed):
    """Squashed 256x256 image -> 2 logits (index 0 = watermark)."""
    grid = 8
    feat = 3 * grid * grid
    w1 = numpy_helper.from_array(weights((feat, 32), seed) * 0.5, "w1")
    w2 = numpy_helper.from_array(weights((32, 2), seed + 1), "w2")
    b2 = numpy_helper.from_array(np.array([0.3, -0.2], dtype=np.float32), "b2")
    shape = numpy_helper.from_array(np.array([0, feat], dtype=np.int64), "flat_shape")
    nodes = [
        helper.make_node("AveragePool", ["pixel_values"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "watermark",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["N", 3, 256, 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [w1, w2, b2, shape],
    )
    return helper.make_model(graph)


def head(name, sigmoid, seed):
    """768-d embedding -> one score (a small MLP; sigmoid for the NSFW probability)."""
    w1 = numpy_helper.from_array(weights((768, 64), seed) * 0.2, "w1")
    b1 = numpy_helper.from_array(weights((64,), seed + 1) * 0.1, "b1")
    w2 = numpy_helper.from_array(weights((64, 1), seed + 2), "w2")
    b2 = numpy_helper.from_array(np.array([5.0 if not sigmoid else -0.5], dtype=np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["embedding", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["logit" if sigmoid else "score"]),
    ]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["score"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 768])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [w1, b1, w2, b2],
    )
    return helper.make_model(graph)


# Inputs by closed formula; filters/tests/models.rs rebuilds them identically.
def pixel_input(n, size):
    """x[b,c,y,x] = sin(0.05*(b+1)*(x + 2y) + c) * 1.5, float32."""
    b = np.arange(n, dtype=np.float64).reshape(n, 1, 1, 1)
    c = np.arange(3, dtype=np.float64).reshape(1, 3, 1, 1)
    y = np.arange(size, dtype=np.float64).reshape(1, 1, size, 1)
    x = np.arange(size, dtype=np.float64).reshape(1, 1, 1, size)
    return (np.sin(0.05 * (b + 1) * (x + 2 * y) + c) * 1.5).astype(np.float32)


def token_input():
    """Three rows: SOT, ids (1000 + 37*i*(r+1)) % 49000 for i < len_r, EOT, zero padding; lengths 5, 20, 75."""
    rows = []
    for r, length in enumerate([5, 20, 75]):
        ids = [49406] + [(1000 + 37 * i * (r + 1)) % 49000 for i in range(length)] + [49407]
        rows.append(ids + [0] * (77 - len(ids)))
    return np.array(rows, dtype=np.int64)


def embedding_input(n):
    """e[b,i] = cos(0.1*i + b), L2-normalised per row, float32."""
    b = np.arange(n, dtype=np.float64).reshape(n, 1)
    i = np.arange(768, dtype=np.float64).reshape(1, 768)
    e = np.cos(0.1 * i + b)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return e.astype(np.float32)


def main():
    models = {
        "clip_b32_image.onnx": image_encoder("clip_b32_image", "pixel_values", "image_embeds", 224, 512, "N", False, 1),
        "clip_b32_text.onnx": text_encoder("clip_b32_text", "input_ids", "text_embeds", TensorProto.INT64, 512, "N", False, 11),
        "clip_l14_image.onnx": image_encoder("clip_l14_image", "pixel_values", "image_embeds", 224, 768, "N", False, 21),
        "clip_b32_image_fixed1.onnx": image_encoder("clip_b32_image_fixed1", "image", "embedding", 224, 512, 1, True, 1),
        "clip_b32_text_i32_fixed1.onnx": text_encoder("clip_b32_text_i32_fixed1", "text", "embedding", TensorProto.INT32, 512, 1, True, 11),
        "watermark.onnx": watermark(31),
        "aesthetic_head.onnx": head("aesthetic_head", False, 41),
        "nsfw_head.onnx": head("nsfw_head", True, 51),
    }
    for name, m in models.items():
        save(m, name)

    def run(name, feeds):
        s = ort.InferenceSession(os.path.join(HERE, name), providers=["CPUExecutionProvider"])
        return s.run(None, feeds)[0]

    px224 = pixel_input(2, 224)
    px256 = pixel_input(2, 256)
    tokens = token_input()
    emb = embedding_input(3)
    refs = {
        "clip_b32_image.onnx": run("clip_b32_image.onnx", {"pixel_values": px224}),
        "clip_l14_image.onnx": run("clip_l14_image.onnx", {"pixel_values": px224}),
        "clip_b32_text.onnx": run("clip_b32_text.onnx", {"input_ids": tokens}),
        "clip_b32_text_i32_fixed1.onnx": np.concatenate(
            [run("clip_b32_text_i32_fixed1.onnx", {"text": tokens[i : i + 1].astype(np.int32)}) for i in range(3)]
        ),
        "watermark.onnx": run("watermark.onnx", {"pixel_values": px256}),
        "aesthetic_head.onnx": run("aesthetic_head.onnx", {"embedding": emb}),
        "nsfw_head.onnx": run("nsfw_head.onnx", {"embedding": emb}),
    }
    out = {
        "generator": "filters/tests/models/make_models.py",
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "inputs": {
            "pixel_values": "pixel_input(2, size): sin(0.05*(b+1)*(x+2y)+c)*1.5",
            "input_ids": "token_input(): lengths 5, 20, 75",
            "embedding": "embedding_input(3): cos(0.1*i+b), L2-normalised",
        },
        "outputs": {k: {"shape": list(v.shape), "data": [float(x) for x in v.reshape(-1)]} for k, v in refs.items()},
    }
    with open(os.path.join(HERE, "reference_outputs.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", len(models), "models and reference_outputs.json")


if __name__ == "__main__":
    main()
