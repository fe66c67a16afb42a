#!/usr/bin/env python3
"""Exports the real filter models to ONNX with the signatures `llamagen filter score` expects.

Needs a machine with internet access (weights are downloaded) and:
    pip install torch open_clip_torch==3.3.0 timm onnx onnxruntime
    (and for --nsfw: pip install tensorflow tf2onnx autokeras)

Writes into OUT_DIR (default ./models):

| file                   | model                                             | input                          | output                     |
|------------------------|---------------------------------------------------|--------------------------------|----------------------------|
| clip_b32_image.onnx    | OpenAI CLIP ViT-B/32 `encode_image`               | pixel_values f32 [N,3,224,224] | image_embeds f32 [N,512]   |
| clip_b32_text.onnx     | OpenAI CLIP ViT-B/32 `encode_text`                | input_ids i64 [N,77]           | text_embeds f32 [N,512]    |
| clip_l14_image.onnx    | OpenAI CLIP ViT-L/14 `encode_image`               | pixel_values f32 [N,3,224,224] | image_embeds f32 [N,768]   |
| watermark.onnx         | LAION-5B watermark detector (EfficientNet-B3a)    | pixel_values f32 [N,3,256,256] | logits f32 [N,2] (0 = wm)  |
| nsfw_head.onnx (opt.)  | LAION CLIP-based NSFW detector (ViT-L/14, Keras)  | embedding f32 [N,768]          | score f32 [N,1]            |

Embeddings are written unnormalised (llamagen normalises every embedding itself). Each export is
checked against the PyTorch model on a random batch with onnxruntime before it is kept.

Usage: python scripts/export_filter_models.py [--out models] [--nsfw] [--opset 17]
"""
import argparse
import os
import urllib.request

import numpy as np

WATERMARK_URL = "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt"
NSFW_URL = "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/clip_autokeras_binary_nsfw.zip"


def check(path, feeds, expected, tol=1e-3):
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = s.run(None, feeds)[0]
    err = np.abs(got - expected).max()
    if err > tol * (1 + np.abs(expected).max()):
        raise SystemExit(f"{path}: ONNX output differs from PyTorch by {err}")
    print(f"{path}: ok (max |diff| {err:.2e})")


def export_clip(arch, out, opset, with_text):
    import open_clip
    import torch

    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained="openai")
    model.eval()
    tag = {"ViT-B-32": "b32", "ViT-L-14": "l14"}[arch]

    class Image(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m.encode_image(pixel_values)

    class Text(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m.encode_text(input_ids)

    x = torch.randn(2, 3, 224, 224)
    path = os.path.join(out, f"clip_{tag}_image.onnx")
    torch.onnx.export(
        Image(model), (x,), path, input_names=["pixel_values"], output_names=["image_embeds"],
        dynamic_axes={"pixel_values": {0: "N"}, "image_embeds": {0: "N"}}, opset_version=opset,
    )
    with torch.no_grad():
        check(path, {"pixel_values": x.numpy()}, Image(model)(x).numpy())
    if with_text:
        tok = open_clip.get_tokenizer(arch)
        ids = tok(["a photo of a cat", "a diagram"]).to(torch.int64)
        path = os.path.join(out, f"clip_{tag}_text.onnx")
        torch.onnx.export(
            Text(model), (ids,), path, input_names=["input_ids"], output_names=["text_embeds"],
            dynamic_axes={"input_ids": {0: "N"}, "text_embeds": {0: "N"}}, opset_version=opset,
        )
        with torch.no_grad():
            check(path, {"input_ids": ids.numpy()}, Text(model)(ids).numpy())


def export_watermark(out, opset):
    import timm
    import torch

    model = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
    model.classifier = torch.nn.Sequential(
        torch.nn.Linear(in_features=1536, out_features=625),
        torch.nn.ReLU(),
        torch.nn.Dropout(p=0.3),
        torch.nn.Linear(in_features=625, out_features=256),
        torch.nn.ReLU(),
        torch.nn.Linear(in_features=256, out_features=2),
    )
    weights = os.path.join(out, "watermark_model_v1.pt")
    if not os.path.exists(weights):
        urllib.request.urlretrieve(WATERMARK_URL, weights)
    state = torch.load(weights, map_location="cpu")
    if isinstance(state, dict) and "weights" in state:
        state = state["weights"]
    model.load_state_dict(state)
    model.eval()
    x = torch.randn(2, 3, 256, 256)
    path = os.path.join(out, "watermark.onnx")
    torch.onnx.export(
        model, (x,), path, input_names=["pixel_values"], output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "N"}, "logits": {0: "N"}}, opset_version=opset,
    )
    with torch.no_grad():
        check(path, {"pixel_values": x.numpy()}, model(x).numpy())


def export_nsfw(out, opset):
    import zipfile

    import tensorflow as tf
    import tf2onnx

    z = os.path.join(out, "clip_autokeras_binary_nsfw.zip")
    if not os.path.exists(z):
        urllib.request.urlretrieve(NSFW_URL, z)
    zipfile.ZipFile(z).extractall(out)
    import autokeras  # noqa: F401  (registers the custom layers)

    model = tf.keras.models.load_model(os.path.join(out, "clip_autokeras_binary_nsfw"), compile=False)
    spec = (tf.TensorSpec((None, 768), tf.float32, name="embedding"),)
    path = os.path.join(out, "nsfw_head.onnx")
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=path)
    # The Rust side reads the output name from the model (its only output is used).
    x = np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    check(path, {"embedding": x}, model.predict(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--nsfw", action="store_true", help="also convert LAION's Keras NSFW head (needs TensorFlow)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    export_clip("ViT-B-32", a.out, a.opset, with_text=True)
    export_clip("ViT-L-14", a.out, a.opset, with_text=False)
    export_watermark(a.out, a.opset)
    if a.nsfw:
        export_nsfw(a.out, a.opset)


if __name__ == "__main__":
    main()
