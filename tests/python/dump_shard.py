"""Reads a llamagen shard with pyarrow and prints every row as canonical JSON (one per line).

Binary payloads are printed as their SHA-256, timestamps as microseconds since the epoch, so the
Rust side can build the same lines from the values it wrote and compare them exactly.
"""
import hashlib
import json
import sys

import pyarrow.parquet as pq


def canon(v):
    if isinstance(v, bytes):
        return "sha256:" + hashlib.sha256(v).hexdigest()
    if isinstance(v, dict):
        return {k: canon(x) for k, x in v.items()}
    if isinstance(v, list):
        return [canon(x) for x in v]
    return v


table = pq.read_table(sys.argv[1])
meta = table.schema.metadata or {}
print(json.dumps({"schema_version": meta.get(b"llamagen.schema_version", b"").decode(),
                  "columns": table.schema.names}))
for ts_col in ("downloaded_at", "updated_at"):
    i = table.schema.get_field_index(ts_col)
    table = table.set_column(i, ts_col, table.column(ts_col).cast("int64"))
for row in table.to_pylist():
    print(json.dumps(canon(row), sort_keys=True))
