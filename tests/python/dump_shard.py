"""Reads a llamagen shard with pyarrow and prints every row as canonical JSON (one per line).

Binary payloads are printed as their SHA-256, timestamps as microseconds since the epoch, so the
Rust side can build the same lines from the values it wrote and compare them exactly.
"""
import json
import sys

import pyarrow.parquet as pq

from canon import canon, int_timestamps

table = pq.read_table(sys.argv[1])
meta = table.schema.metadata or {}
print(json.dumps({"schema_version": meta.get(b"llamagen.schema_version", b"").decode(),
                  "columns": table.schema.names}))
for row in int_timestamps(table).to_pylist():
    print(json.dumps(canon(row), sort_keys=True))
