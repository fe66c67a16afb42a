"""Reads a llamagen dataset as Delta tables with PyPI's deltalake and polars, and prints what
they see as canonical JSON lines, for the Rust side to compare with what it wrote.

The dataset's table (`<path>`) holds every column, the wide ones null; each column group with
data is the table `<path>.<group>` (key + the group's columns), joined on `key` as a user would.

Line 1: {"versions": [...], "operations": [...], "schema_version": ..., "columns": [...],
"groups": {group: version}} (the dataset table's history as deltalake reports it, oldest first).
Then one line per row, sorted by key, from deltalake (binary payloads as their SHA-256,
timestamps as microseconds since the epoch). The script fails if polars reads different values
than deltalake.
"""
import json
import os
import sys

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from canon import canon, int_timestamps

GROUPS = ["images", "t5", "vq"]


def rows_of(table):
    return sorted((canon(r) for r in int_timestamps(table).to_pylist()), key=lambda r: r["key"])


def with_groups(table, read_group):
    """`table` with each group's columns taken from its table, left-joined on key (by
    index_in/take: Acero's join has no list columns)."""
    for group in GROUPS:
        part = read_group(group)
        if part is None:
            continue
        rows = pc.index_in(table.column("key"), value_set=part.column("key"))
        taken = part.take(rows)
        for name in part.column_names:
            if name != "key":
                i = table.schema.get_field_index(name)
                table = table.set_column(i, table.schema.field(i), taken.column(name).cast(table.schema.field(i).type))
    return table


path = sys.argv[1]
dt = DeltaTable(path)
history = sorted(dt.history(), key=lambda h: h["version"])
groups = {g: DeltaTable(f"{path}.{g}").version() for g in GROUPS if os.path.isdir(f"{path}.{g}/_delta_log")}


def deltalake_group(g):
    return pa.table(DeltaTable(f"{path}.{g}").to_pyarrow_dataset().to_table()) if g in groups else None


def polars_group(g):
    return pl.read_delta(f"{path}.{g}").to_arrow() if g in groups else None


table = with_groups(pa.table(dt.to_pyarrow_dataset().to_table()), deltalake_group)
rows = rows_of(table)
print(json.dumps({
    "versions": [h["version"] for h in history],
    "operations": [h.get("operation") for h in history],
    "stages": [h.get("llamagen.operation") for h in history],
    "schema_version": dt.metadata().configuration.get("llamagen.schemaVersion"),
    "columns": table.schema.names,
    "version": dt.version(),
    "groups": groups,
}))
polars_rows = rows_of(with_groups(pl.read_delta(path).to_arrow(), polars_group))
if json.dumps(polars_rows, sort_keys=True) != json.dumps(rows, sort_keys=True):
    sys.exit("polars.read_delta read different values than deltalake")
for r in rows:
    print(json.dumps(r, sort_keys=True))
