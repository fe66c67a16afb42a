#!/usr/bin/env python3
"""Load generator for `llamagen serve` and its offline baselines (Python stdlib only).

  serve_load.py http    --url http://127.0.0.1:8000 --clients 16 --seconds 30
  serve_load.py offline --bin target/release/llamagen --model-args "..." --clients 16 --seconds 30 [--static]

Each of --clients threads sends one c2i request (one image, label and seed varying) after
another for --seconds, then the run waits for the requests in flight. `http` posts them to a
running server. `offline` serves them with the offline sampler, one `llamagen sample` process
per request, one at a time (the sequential baseline); with --static it takes every request
waiting when the previous batch ends into one `llamagen sample --labels ...` run (static
batching: a batch runs to its end before the next one starts). Prints one JSON line: images,
images/min, latency p50/p95/mean in seconds, errors.
"""
import argparse
import json
import queue
import subprocess
import tempfile
import threading
import time
import urllib.request


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def body(i, args):
    return {
        "class_label": i % args.classes,
        "seed": i,
        "cfg_scale": args.cfg_scale,
        "top_k": args.top_k,
    }


def http_request(args, b):
    req = urllib.request.Request(
        args.url + "/v1/generate",
        data=json.dumps(b).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        data = json.loads(r.read())
    return len(data["images"])


class Offline:
    """One worker running `llamagen sample` for the waiting requests (one, or all: --static)."""

    def __init__(self, args):
        self.args = args
        self.q = queue.Queue()
        self.tmp = tempfile.mkdtemp(prefix="llamagen-offline-")
        threading.Thread(target=self.worker, daemon=True).start()

    def worker(self):
        while True:
            jobs = [self.q.get()]
            while self.args.static:
                try:
                    jobs.append(self.q.get_nowait())
                except queue.Empty:
                    break
            labels = ",".join(str(b["class_label"]) for b, _ in jobs)
            a = self.args
            cmd = [a.bin, "sample", *a.model_args.split(), "--labels", labels,
                   "--cfg-scale", str(a.cfg_scale), "--top-k", str(a.top_k),
                   "--seed", str(jobs[0][0]["seed"]), "--batch-size", str(max(1, len(jobs))),
                   "--out", f"{self.tmp}/grid.png"]
            r = subprocess.run(cmd, capture_output=True)
            for _, done in jobs:
                done.put(r.returncode == 0 and 1 or RuntimeError(r.stderr.decode()[-500:]))

    def request(self, b):
        done = queue.Queue()
        self.q.put((b, done))
        r = done.get()
        if isinstance(r, Exception):
            raise r
        return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["http", "offline"])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--bin", default="target/release/llamagen")
    p.add_argument("--model-args", default="", help="checkpoint/config/vq flags of `llamagen sample`")
    p.add_argument("--static", action="store_true")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000)
    args = p.parse_args()
    offline = Offline(args) if args.mode == "offline" else None
    lat, errors, images = [], [], [0]
    lock = threading.Lock()
    counter = [0]
    t0 = time.time()
    stop = t0 + args.seconds

    def client():
        while time.time() < stop:
            with lock:
                i = counter[0]
                counter[0] += 1
            b = body(i, args)
            s = time.time()
            try:
                n = http_request(args, b) if offline is None else offline.request(b)
                with lock:
                    lat.append(time.time() - s)
                    images[0] += n
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(e)[:200])

    ts = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.time() - t0
    print(json.dumps({
        "mode": args.mode + ("-static" if args.static else ""),
        "clients": args.clients,
        "wall_s": round(wall, 2),
        "images": images[0],
        "images_per_min": round(images[0] / wall * 60, 2),
        "p50_s": round(percentile(lat, 50), 3),
        "p95_s": round(percentile(lat, 95), 3),
        "mean_s": round(sum(lat) / len(lat), 3) if lat else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }))


if __name__ == "__main__":
    main()
