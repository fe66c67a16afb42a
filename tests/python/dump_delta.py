"""Reads a llamagen dataset as a Delta table with PyPI's deltalake and polars, and prints what
they see as canonical JSON lines, for the Rust side to compare with what it wrote.

Line 1: {"versions": [...], "operations": [...], "schema_version": ..., "columns": [...]}
(the table history as deltalake reports it, oldest first). Then one line per row, sorted by key,
from deltalake (binary payloads as their SHA-256, timestamps as microseconds since the epoch).
The script fails if polars reads different values than deltalake.
"""
import json
import sys

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable

from canon import canon, int_timestamps


def rows_of(table):
    return sorted((canon(r) for r in int_timestamps(table).to_pylist()), key=lambda r: r["key"])


path = sys.argv[1]
dt = DeltaTable(path)
history = sorted(dt.history(), key=lambda h: h["version"])

table = pa.table(dt.to_pyarrow_dataset().to_table())
rows = rows_of(table)
print(json.dumps({
    "versions": [h["version"] for h in history],
    "operations": [h.get("operation") for h in history],
    "stages": [h.get("llamagen.operation") for h in history],
    "schema_version": dt.metadata().configuration.get("llamagen.schemaVersion"),
    "columns": table.schema.names,
    "version": dt.version(),
}))
polars_rows = rows_of(pl.read_delta(path).to_arrow())
if json.dumps(polars_rows, sort_keys=True) != json.dumps(rows, sort_keys=True):
    sys.exit("polars.read_delta read different values than deltalake")
for r in rows:
    print(json.dumps(r, sort_keys=True))
