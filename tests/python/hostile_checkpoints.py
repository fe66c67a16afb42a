"""Writes hostile torch checkpoints (zip files in torch.save's layout) for the security tests.

Each pickle is written opcode by opcode, so no torch is needed and nothing is ever unpickled
here. Usage: hostile_checkpoints.py OUT_DIR. Writes:
- huge_tensor.pt: 617-byte-class file whose one tensor declares 64 GiB (131072 x 131072 f32);
- overflow_shape.pt: a tensor whose shape product overflows 64 bits;
- short_storage.pt: a tensor larger than the storage it declares;
- memo_bomb.pt: a 2 KB pickle that doubles a list through the memo 40 times;
- bad_tuple.pt: _rebuild_tensor_v2 called with one argument;
- offset_head.pt (not hostile): a LAION V1 aesthetic head (`weight` 1x4, `bias` 1) whose two
  tensors are views at offsets 2 and 6 of one 7-float storage holding 0, 1.5, 3, ..., 9.
"""

import struct
import sys
import zipfile
from pathlib import Path


def uni(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def intv(v: int) -> bytes:
    if 0 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    return b"\x8a\x08" + struct.pack("<q", v)


def tensor(size, stride, storage_elems: int, offset: int = 0) -> bytes:
    storage = (
        b"(" + uni("storage") + b"ctorch\nFloatStorage\n" + uni("0") + uni("cpu")
        + intv(storage_elems) + b"tQ"
    )
    tup = lambda xs: b"(" + b"".join(intv(x) for x in xs) + b"t"
    args = (
        b"(" + storage + intv(offset) + tup(size) + tup(stride) + b"\x89"
        + b"ccollections\nOrderedDict\n)R" + b"t"
    )
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def state_dict(name: str, t: bytes) -> bytes:
    return b"\x80\x02}(" + uni(name) + t + b"u."


def write(path: Path, pkl: bytes, data: bytes = b"\0" * 64) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", data)
        z.writestr("archive/version", b"3\n")


def memo_bomb(levels: int = 40) -> bytes:
    out = b"\x80\x02]r" + struct.pack("<I", 0)
    for i in range(levels):
        get = b"j" + struct.pack("<I", i)
        out += b"(" + get + get + b"t"
        out += b"r" + struct.pack("<I", i + 1)
    return out + b"."


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    name = "tok_embeddings.weight"
    n = 131072
    write(out / "huge_tensor.pt", state_dict(name, tensor([n, n], [n, 1], n * n)))
    big = 2**31 - 1
    write(
        out / "overflow_shape.pt",
        state_dict(name, tensor([big, big, big], [1, 1, 1], 16)),
    )
    write(out / "short_storage.pt", state_dict(name, tensor([4, 4], [4, 1], 8)))
    write(out / "memo_bomb.pt", memo_bomb())
    bad = b"\x80\x02}(" + uni(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(J\x00\x00\x00\x00tRu."
    write(out / "bad_tuple.pt", bad)
    head = (
        b"\x80\x02}(" + uni("weight") + tensor([1, 4], [4, 1], 7, offset=2)
        + uni("bias") + tensor([1], [1], 7, offset=6) + b"u."
    )
    write(out / "offset_head.pt", head, struct.pack("<7f", *[1.5 * i for i in range(7)]))


if __name__ == "__main__":
    main()
