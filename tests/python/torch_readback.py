"""Reads a checkpoint written by `llamagen export checkpoint --format torch` with PyPI torch, as
the official sample scripts do, and compares every tensor with the source safetensors file.

    python torch_readback.py OUT.pt SOURCE.safetensors [STEPS]

Prints one JSON line: {"tensors": n, "steps": s or null, "keys": [...]}; exits non-zero on any
difference (names, dtype, shape or a single bit of a value).
"""
import json
import sys
from collections import OrderedDict

import torch
from safetensors.torch import load_file

out, source = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else None

ckpt = torch.load(out, map_location="cpu", weights_only=True)
expected_keys = {"model"} | ({"steps"} if steps is not None else set())
assert set(ckpt) == expected_keys, f"top-level keys {sorted(ckpt)}, expected {sorted(expected_keys)}"
assert ckpt.get("steps") == steps, f"steps {ckpt.get('steps')} != {steps}"
sd = ckpt["model"]
assert isinstance(sd, OrderedDict), type(sd)
ref = load_file(source)
ref = {k: v for k, v in ref.items() if k != "freqs_cis"}
assert set(sd) == set(ref), f"names differ: {sorted(set(sd) ^ set(ref))}"
for name, want in ref.items():
    got = sd[name]
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.is_contiguous(), f"{name} is not contiguous"
    assert torch.equal(got.view(torch.uint8) if got.dim() else got, want.view(torch.uint8) if want.dim() else want), f"{name}: values differ"

# Memory-mapped loading needs the storages aligned as torch.save aligns them.
mm = torch.load(out, map_location="cpu", weights_only=True, mmap=True)["model"]
for name, want in ref.items():
    assert torch.equal(mm[name], want), f"{name}: values differ under mmap=True"

print(json.dumps({"tensors": len(sd), "steps": ckpt.get("steps"), "keys": list(sd)[:3]}))
