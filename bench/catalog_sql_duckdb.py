"""DuckDB side of bench/catalog_sql.sh: the same queries over the committed shards of a catalog.

usage: catalog_sql_duckdb.py <root> <repeats> <threads> <sql>...
Prints one JSON line per query: {"engine", "query", "open_s", "times_s", "result_rows"}.
"""
import json
import sys
import time

import duckdb
from deltalake import DeltaTable

root, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
queries = sys.argv[4:]
t0 = time.perf_counter()
# The committed shards of the latest table version, as the deltalake package lists them.
files = DeltaTable(f"{root}/samples").file_uris()
con = duckdb.connect()
con.execute(f"SET threads = {threads}")
listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet([{listing}])")
open_s = time.perf_counter() - t0
for q in queries:
    times, rows = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        rows = len(con.execute(q).to_arrow_table())
        times.append(time.perf_counter() - t)
    print(json.dumps({"engine": "duckdb", "query": q, "open_s": open_s, "times_s": times, "result_rows": rows}))
