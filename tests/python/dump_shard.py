"""Reads a llamagen shard with pyarrow and prints every row as canonical JSON (one per line).

Usage: dump_shard.py BASE_FILE [COLUMN_FILE ...]. A shard is a base file plus one column file per
column group (images, t5, vq); each column file holds `key` and its group's columns for the base
file's rows in the same order, which this script checks before putting those columns in place of
the base file's nulls.

Binary payloads are printed as their SHA-256, timestamps as microseconds since the epoch, so the
Rust side can build the same lines from the values it wrote and compare them exactly.
"""
import json
import sys

import pyarrow.parquet as pq

from canon import canon, int_timestamps

table = pq.read_table(sys.argv[1])
meta = table.schema.metadata or {}
for path in sys.argv[2:]:
    part = pq.read_table(path)
    if part.column("key") != table.column("key"):
        sys.exit(f"{path}: its keys differ from the base file's")
    if (part.schema.metadata or {}).get(b"llamagen.schema_version") != meta.get(b"llamagen.schema_version"):
        sys.exit(f"{path}: another schema version than the base file's")
    for name in part.schema.names[1:]:
        table = table.set_column(table.schema.get_field_index(name), part.schema.field(name), part.column(name))
print(json.dumps({"schema_version": meta.get(b"llamagen.schema_version", b"").decode(),
                  "columns": table.schema.names}))
for row in int_timestamps(table).to_pylist():
    print(json.dumps(canon(row), sort_keys=True))
