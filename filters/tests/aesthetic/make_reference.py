#!/usr/bin/env python3
"""Reference outputs of LAION's real aesthetic heads (the bundled .pth files) for the Rust tests.

The checkpoints are read without torch: a torch >= 1.6 `.pth` is a zip holding `*/data.pkl` (a
pickle whose tensors are `torch._utils._rebuild_tensor_v2` calls over persistent storage ids) and
`*/data/<key>` raw little-endian storages. The heads are evaluated layer by layer in float32 with
numpy, as `nn.Sequential` does in eval mode (Dropout = identity; no activations in the
"linearMSE" V2 head; V1 is one Linear).

Inputs: embedding_input(n, d) below (the Rust test rebuilds it): e[b,i] = cos(0.1*i + b) + 0.05*b*sin(0.37*i),
L2-normalised per row, float32.

Run: .venv/bin/python filters/tests/aesthetic/make_reference.py   (needs numpy only)
Writes filters/tests/aesthetic/reference_outputs.json.
"""
import collections
import json
import os
import pickle
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "..", "assets", "laion-aesthetic")


def load_state_dict(path):
    z = zipfile.ZipFile(path)
    pkl = [n for n in z.namelist() if n.endswith("data.pkl")][0]
    prefix = pkl[: -len("data.pkl")]

    def rebuild(storage, offset, shape, stride, *args):
        n = int(np.prod(shape)) if shape else 1
        flat = storage[offset : offset + n]
        return flat.reshape(shape)

    class U(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module == "torch" and name == "FloatStorage":
                return "float32"
            raise pickle.UnpicklingError(f"unexpected {module}.{name}")

        def persistent_load(self, pid):
            _, dtype, key, _location, _numel = pid
            assert dtype == "float32"
            return np.frombuffer(z.read(f"{prefix}data/{key}"), dtype="<f4")

    return U(z.open(pkl)).load()


def embedding_input(n, d):
    b = np.arange(n, dtype=np.float64).reshape(n, 1)
    i = np.arange(d, dtype=np.float64).reshape(1, d)
    e = np.cos(0.1 * i + b) + 0.05 * b * np.sin(0.37 * i)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return e.astype(np.float32)


def forward(sd, prefixes, x):
    for p in prefixes:
        w, b = sd[p + "weight"], sd[p + "bias"]
        x = (x @ w.T + b).astype(np.float32)
    return x


def main():
    out = {"generator": "filters/tests/aesthetic/make_reference.py", "numpy": np.__version__, "heads": {}}
    cases = [
        ("sac+logos+ava1-l14-linearMSE.pth", ["layers.0.", "layers.2.", "layers.4.", "layers.6.", "layers.7."], 768),
        ("sa_0_4_vit_l_14_linear.pth", [""], 768),
        ("sa_0_4_vit_b_32_linear.pth", [""], 512),
    ]
    for name, prefixes, d in cases:
        sd = load_state_dict(os.path.join(ASSETS, name))
        x = embedding_input(4, d)
        y = forward(sd, prefixes, x)[:, 0]
        zero = forward(sd, prefixes, np.zeros((1, d), dtype=np.float32))[0, 0]
        out["heads"][name] = {"dim": d, "scores": [float(v) for v in y], "score_of_zero": float(zero)}
        print(name, y, zero)
    with open(os.path.join(HERE, "reference_outputs.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
