"""Canonical JSON values of Arrow rows, shared by the dump scripts: binary payloads as their
SHA-256, timestamps as microseconds since the epoch, so the Rust side can build the same values
from what it wrote and compare them exactly."""
import hashlib


def canon(v):
    if isinstance(v, bytes):
        return "sha256:" + hashlib.sha256(v).hexdigest()
    if isinstance(v, dict):
        return {k: canon(x) for k, x in v.items()}
    if isinstance(v, list):
        return [canon(x) for x in v]
    return v


def int_timestamps(table):
    """The table with its timestamp columns as int64 microseconds."""
    for ts_col in ("downloaded_at", "updated_at"):
        i = table.schema.get_field_index(ts_col)
        table = table.set_column(i, ts_col, table.column(ts_col).cast("int64"))
    return table
