#!/usr/bin/env python3
"""Reference CLIP token ids for the tokenizer parity test (filters/tests/tokenizer.rs).

The tokenizer below is OpenAI CLIP's `clip/simple_tokenizer.py` and `clip.tokenize(..., truncate=True)`
(as open_clip_torch 3.x ships it for the OpenAI models, `clean="lower"`), copied here so the fixture
needs no torch: ftfy.fix_text, html.unescape twice, strip, whitespace collapse, lowercase, the
`regex` split, byte-level BPE with the first 48,894 merges, [SOT] + ids + [EOT], truncated to 77
keeping EOT last. Code from openai/CLIP, MIT licence (data/licenses/openai-CLIP-LICENSE.txt).

Texts: every caption in data/captions/ (COCO, PartiPrompts, ImageInWords fields IIW, IIW-P5B,
DOCCI, the first-sentence cases) and every LAION alt-text in
data/laion_meta/img2dataset_test_10000.parquet, plus hand-written edge cases.

For each text the fixture also records `ftfy_changed`: whether ftfy.fix_text changed the text in a
way the crate's cleaning does not reproduce (mojibake repair); see the Rust test for how it is used.

Run (from the repository root): .venv/bin/pip install -r requirements-bench.txt &&
    .venv/bin/python filters/tests/tokenizer/make_tokens.py
Writes filters/tests/tokenizer/expected_tokens.jsonl.gz.
"""

import csv
import gzip
import html
import json
import os
from functools import lru_cache

import ftfy
import pyarrow.parquet as pq
import regex as re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BPE = os.path.join(ROOT, "filters", "assets", "bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expected_tokens.jsonl.gz")


@lru_cache()
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    cs = [chr(n) for n in cs]
    return dict(zip(bs, cs))


def get_pairs(word):
    pairs = set()
    prev_char = word[0]
    for char in word[1:]:
        pairs.add((prev_char, char))
        prev_char = char
    return pairs


def basic_clean(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text):
    text = re.sub(r"\s+", " ", text)
    text = text.strip()
    return text


class SimpleTokenizer(object):
    def __init__(self, bpe_path=BPE):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = merges[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(merge.split()) for merge in merges]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        for merge in merges:
            vocab.append("".join(merge))
        vocab.extend(["<|startoftext|>", "<|endoftext|>"])
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = re.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE,
        )

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            new_word = tuple(new_word)
            word = new_word
            if len(word) == 1:
                break
            else:
                pairs = get_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        bpe_tokens = []
        text = whitespace_clean(basic_clean(text)).lower()
        for token in re.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            bpe_tokens.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return bpe_tokens


def tokenize(tok, text, context_length=77):
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    tokens = [sot] + tok.encode(text) + [eot]
    if len(tokens) > context_length:
        tokens = tokens[:context_length]
        tokens[-1] = eot
    return tokens


EDGE_CASES = [
    "",
    "   ",
    "A photo of a CAT",
    "Tom &amp; Jerry &lt;3 &amp;amp; friends &#39;quoted&#39; &eacute;t&eacute; &notanentity; &amp",
    "“Curly” ‘quotes’ and it’s fine",
    "ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ １２３",
    "ligatures: ﬁne ﬂower ﬀ",
    "tabs\tand\nnewlines\r\nand\u2028separators\u00a0nbsp",
    "control\x00chars\x07here\x1b[31mred\x1b[0m",
    "<|endoftext|> inside text <|startoftext|>",
    "emoji 😀👍🏽 and 中文字符 and עברית and Ελληνικά ΣΟΦΟΣ",
    "numbers 1234567890 ½ ² ٣",
    "don't won't I'm you're we've they'll he'd IT'S",
    "e\u0301 combining acute vs é",
    "word " * 100,
    "x" * 300,
]


def texts():
    out = []
    with open(os.path.join(ROOT, "data", "captions", "llamagen_coco_captions.csv"), newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            out.append((f"coco:{i}", row["Prompt"]))
    with open(os.path.join(ROOT, "data", "captions", "llamagen_PartiPrompts.tsv"), newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f, delimiter="\t")):
            out.append((f"parti:{i}", row["Prompt"]))
    iiw = os.path.join(ROOT, "data", "captions", "imageinwords")
    for name in sorted(os.listdir(iiw)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(iiw, name), encoding="utf-8") as f:
            for i, line in enumerate(f):
                d = json.loads(line)
                for field in ("IIW", "IIW-P5B", "DOCCI"):
                    if isinstance(d.get(field), str):
                        out.append((f"{name}:{i}:{field}", d[field]))
    with open(os.path.join(ROOT, "data", "captions", "first_sentence_cases.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            out.append((f"first_sentence:{i}", json.loads(line)["text"]))
    table = pq.read_table(os.path.join(ROOT, "data", "laion_meta", "img2dataset_test_10000.parquet"), columns=["TEXT"])
    for i, t in enumerate(table.column("TEXT").to_pylist()):
        if t is not None:
            out.append((f"laion:{i}", t))
    for i, t in enumerate(EDGE_CASES):
        out.append((f"edge:{i}", t))
    return out


def main():
    tok = SimpleTokenizer()
    n = 0
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as f:
        for source, text in texts():
            ids = tokenize(tok, text)
            fixed = ftfy.fix_text(text, fix_encoding=False)
            changed = ftfy.fix_text(text) != fixed
            f.write(json.dumps({"source": source, "text": text, "ids": ids, "ftfy_encoding_fix": changed}, ensure_ascii=False) + "\n")
            n += 1
    print(f"wrote {n} texts to {OUT}")


if __name__ == "__main__":
    main()
