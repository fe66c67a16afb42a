"""T5 encoder throughput: `transformers` T5EncoderModel against `llamagen` (candle) on the same CPU,
the same random-weight FLAN-T5-base-sized config (d_model 768, 12 layers, 12 heads, d_ff 2048,
gated-gelu, vocab 32128), the same thread count and the same real captions of mixed length
(COCO, PartiPrompts, ImageInWords long descriptions), cleaned by LlamaGen's preprocessing
beforehand (cleaning is not timed on either side).

Run through bench/t5_encoder.sh. Prints one JSON line per side and the ratios.
"""

import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

import torch
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIX = os.path.join(ROOT, "encode", "tests", "fixtures", "t5")
sys.path.insert(0, FIX)
from generate import llamagen_preprocess  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
N = int(os.environ.get("BENCH_CAPTIONS", "256"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def captions():
    random.seed(0)
    coco, parti, iiw = [], [], []
    with open(os.path.join(ROOT, "data/captions/llamagen_coco_captions.csv"), newline="") as f:
        coco = [r["Prompt"] for r in csv.DictReader(f)]
    with open(os.path.join(ROOT, "data/captions/llamagen_PartiPrompts.tsv"), newline="") as f:
        parti = [r["Prompt"] for r in csv.DictReader(f, delimiter="\t")]
    with open(os.path.join(ROOT, "data/captions/first_sentence_cases.jsonl")) as f:
        iiw = [json.loads(l)["text"] for l in f]
    picked = random.sample(coco, N // 2) + random.sample(parti, N // 4) + random.sample(iiw, N - N // 2 - N // 4)
    random.shuffle(picked)
    out = [llamagen_preprocess(t) for t in picked]
    return [c for c in out if c.strip()]


def median(xs):
    return sorted(xs)[len(xs) // 2]


def main():
    torch.set_num_threads(THREADS)
    work = tempfile.mkdtemp(prefix="t5bench-")
    cfg = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False,
                   dropout_rate=0.0)
    torch.manual_seed(0)
    model = T5EncoderModel(cfg).eval()
    model.save_pretrained(work, safe_serialization=True)
    tok = T5TokenizerFast(tokenizer_file=os.path.join(FIX, "tokenizer.json"))
    texts = captions()
    with open(os.path.join(work, "captions.txt"), "w") as f:
        f.write("\n".join(t.replace("\n", " ") for t in texts) + "\n")

    def run_hf(mode):
        times, tokens = [], 0
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            tokens = 0
            with torch.no_grad():
                if mode == "max_length":
                    # LlamaGen's extract_t5_feature: padding='max_length' (120), fixed batches.
                    for i in range(0, len(texts), 32):
                        enc = tok(texts[i:i + 32], max_length=120, padding="max_length",
                                  truncation=True, return_tensors="pt")
                        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                        tokens += int(enc["attention_mask"].sum())
                else:
                    # Best case for transformers: length-sorted batches padded to the longest.
                    order = sorted(range(len(texts)), key=lambda i: -len(tok(texts[i], max_length=120, truncation=True)["input_ids"]))
                    i = 0
                    while i < len(order):
                        first = len(tok(texts[order[i]], max_length=120, truncation=True)["input_ids"])
                        b = max(1, 4096 // first)
                        batch = [texts[j] for j in order[i:i + b]]
                        enc = tok(batch, max_length=120, padding="longest", truncation=True,
                                  return_tensors="pt")
                        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                        tokens += int(enc["attention_mask"].sum())
                        i += b
            times.append(time.perf_counter() - t0)
        m = median(times)
        return {"side": "transformers " + mode, "captions": len(texts), "valid_tokens": tokens,
                "median_s": round(m, 3), "tokens_per_s": round(tokens / m, 1),
                "runs_s": [round(t, 3) for t in times]}

    results = [run_hf("max_length"), run_hf("sorted_longest")]
    for r in results:
        print(json.dumps(r), flush=True)
    dump = os.path.join(work, "features.f32")
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS), T5_BENCH_DUMP=dump)
    out = subprocess.run([os.environ["T5_BENCH_BIN"], work, os.path.join(FIX, "tokenizer.json"),
                          os.path.join(work, "captions.txt"), str(REPEATS)],
                         env=env, check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(ours), flush=True)
    # Parity at this size: the first 64 captions one by one (no padding) through transformers
    # against the features llamagen computed in its batches.
    import numpy as np
    got = np.fromfile(dump, dtype="<f4")
    worst, at = 0.0, 0
    with torch.no_grad():
        for t in texts[:64]:
            ids = tok(t, max_length=120, truncation=True, return_tensors="pt")["input_ids"]
            want = model(input_ids=ids).last_hidden_state[0].numpy()
            mine = got[at:at + want.size].reshape(want.shape)
            at += want.size
            worst = max(worst, float(np.abs(mine - want).max() / np.abs(want).max()))
    assert at == got.size, "feature count mismatch"
    print("parity: max relative error %.2e over 64 captions (the tests' bound is 1e-4)" % worst)
    for r in results:
        print("ratio llamagen / %s: %.2fx" % (r["side"], ours["tokens_per_s"] / r["tokens_per_s"]))
    print("threads: %d, torch %s, captions %d, mean valid tokens %.1f" % (
        THREADS, torch.__version__, len(texts), ours["valid_tokens"] / len(texts)))


if __name__ == "__main__":
    main()
