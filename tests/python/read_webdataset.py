"""Reads webdataset tar shards with Python's own tarfile module, as users' tools do.

Usage: read_webdataset.py LOCATION
  LOCATION is a local directory or s3://bucket/prefix (endpoint and credentials from the AWS_*
  environment). Prints one JSON object: {"<size>/<shard>.tar": {"members": [[name, size,
  first 4 bytes hex], ...], "json": [the .json records], "txt": [the captions],
  "stats": the _stats.json}, ...}.
"""

import io
import json
import os
import sys
import tarfile


def objects(location):
    """(relative path, bytes) of every object under LOCATION."""
    if location.startswith("s3://"):
        import boto3

        bucket, _, prefix = location[5:].partition("/")
        prefix = prefix.strip("/")
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            for o in page.get("Contents", []):
                rel = o["Key"][len(prefix) + 1 :] if prefix else o["Key"]
                yield rel, s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    else:
        for root, _, files in os.walk(location):
            for f in files:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    yield os.path.relpath(p, location), fh.read()


def main():
    out = {}
    stats = {}
    for rel, data in sorted(objects(sys.argv[1])):
        if rel.startswith("_tmp/"):
            continue  # scratch files of tars being built (local locations)
        if rel.endswith("_stats.json"):
            stats[rel[: -len("_stats.json")] + ".tar"] = json.loads(data)
            continue
        if not rel.endswith(".tar"):
            raise SystemExit(f"unexpected object {rel}")
        entry = {"members": [], "json": [], "txt": []}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf.getmembers():
                if not m.isfile():
                    raise SystemExit(f"{rel}: {m.name} is not a regular file")
                body = tf.extractfile(m).read()
                entry["members"].append([m.name, m.size, body[:4].hex()])
                if m.name.endswith(".json"):
                    entry["json"].append(json.loads(body))
                elif m.name.endswith(".txt"):
                    entry["txt"].append(body.decode("utf-8"))
        out[rel] = entry
    for k, v in stats.items():
        if k not in out:
            raise SystemExit(f"stats without a tar: {k}")
        out[k]["stats"] = v
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
