"""PyTorch reference for bench/train_step.sh: a LlamaGen c2i GPT written from the spec
(shared spec llamagen.md sections 1-2), timed on the CPU exactly like the Rust side.

  python bench/train_step_torch.py --repeats 3 --sample-tokens 256 --threads 2

Prints one JSON object: median training-step seconds (forward + backward + clip + AdamW, GPT-B
dims, 256 tokens, batch 2) and sampling tokens/s (KV cache, CFG, batch 1).
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table(block_size, cls_token_num, head_dim, base=10000.0):
    """(cls + block, head_dim/2, 2): zero rows for the condition positions, then the 2D grid
    (first half of the pairs by row, second half by column)."""
    half = head_dim // 2
    n = half // 2
    g = int(math.isqrt(block_size))
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[:n].float() / half))
    t = torch.arange(g, dtype=torch.float32)
    f = torch.outer(t, freqs)  # (g, n)
    grid = torch.cat([f[:, None, :].expand(g, g, n), f[None, :, :].expand(g, g, n)], dim=-1)
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).reshape(g * g, half, 2)
    return torch.cat([torch.zeros(cls_token_num, half, 2), cache])


def apply_rope(x, freqs):
    # x (B, L, H, D); freqs (L, D/2, 2); interleaved pairs, computed in float32
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, n_head, resid_p):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_p)
        self.k_cache = self.v_cache = None

    def forward(self, x, freqs, mask=None, input_pos=None):
        b, l, d = x.shape
        q, k, v = self.wqkv(x).split([d, d, d], dim=-1)
        q = apply_rope(q.view(b, l, self.n_head, self.head_dim), freqs)
        k = apply_rope(k.view(b, l, self.n_head, self.head_dim), freqs)
        v = v.view(b, l, self.n_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.k_cache is not None:
            self.k_cache[:, :, input_pos] = k
            self.v_cache[:, :, input_pos] = v
            k, v = self.k_cache, self.v_cache
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(b, l, d)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden, p):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, dim, n_head, hidden, p):
        super().__init__()
        self.attention = Attention(dim, n_head, p)
        self.feed_forward = FeedForward(dim, hidden, p)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)

    def forward(self, x, freqs, mask=None, input_pos=None):
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(nn.Module):
    """c2i LlamaGen GPT (cls_token_num 1); dropouts and label dropout as the official defaults."""

    def __init__(self, dim=768, n_layer=12, n_head=12, vocab=16384, num_classes=1000, block_size=256, p=0.1):
        super().__init__()
        hidden = find_multiple(int(2 * 4 * dim / 3), 256)
        self.num_classes, self.block_size, self.class_dropout = num_classes, block_size, 0.1
        self.cls_embedding = nn.Embedding(num_classes + 1, dim)
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.tok_dropout = nn.Dropout(p)
        self.layers = nn.ModuleList(Block(dim, n_head, hidden, p) for _ in range(n_layer))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.freqs = rope_table(block_size, 1, dim // n_head)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def cond(self, labels):
        if self.training:
            drop = torch.rand(labels.shape[0]) < self.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.cls_embedding(labels).unsqueeze(1)

    def forward(self, idx, labels):
        h = self.tok_dropout(torch.cat([self.cond(labels), self.tok_embeddings(idx)], dim=1))
        freqs = self.freqs[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs)
        return self.output(self.norm(h)).float()  # training slice [:, cls_token_num - 1:] is all of it

    def setup_caches(self, max_batch, max_seq):
        for layer in self.layers:
            a = layer.attention
            a.k_cache = torch.zeros(max_batch, a.n_head, max_seq, a.head_dim)
            a.v_cache = torch.zeros(max_batch, a.n_head, max_seq, a.head_dim)
        self.causal_mask = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool))

    def step(self, x, input_pos):
        mask = self.causal_mask[None, None, input_pos]
        freqs = self.freqs[input_pos]
        h = x
        for layer in self.layers:
            h = layer(h, freqs, mask, input_pos)
        return self.output(self.norm(h)).float()


def adamw(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        betas=(0.9, 0.95),
    )


def train_step(model, opt, z, labels):
    logits = model(z[:, :-1], labels)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), z.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


@torch.no_grad()
def generate(model, label, n_tokens, cfg_scale=4.0):
    model.eval()
    b = label.shape[0]
    model.setup_caches(2 * b, find_multiple(1 + n_tokens, 8))
    cond = torch.cat([label, torch.full_like(label, model.num_classes)])
    x = model.cls_embedding(cond).unsqueeze(1)
    out = []
    pos = torch.arange(0, 1)
    for i in range(n_tokens):
        logits = model.step(x, pos)[:, -1]
        c, u = logits.split(b)
        probs = F.softmax(u + (c - u) * cfg_scale, dim=-1)
        nxt = torch.multinomial(probs, 1)
        out.append(nxt)
        x = model.tok_embeddings(torch.cat([nxt, nxt]))
        pos = torch.tensor([1 + i])
    return torch.cat(out, dim=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT()
    opt = adamw(model)
    z = torch.randint(0, 16384, (2, 256))
    labels = torch.randint(0, 1000, (2,))
    model.train()
    train_step(model, opt, z, labels)  # warm-up (allocates AdamW state)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        train_step(model, opt, z, labels)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    toks = generate(model, torch.tensor([207]), args.sample_tokens)
    st = time.perf_counter() - t
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in model.parameters()),
                "step_s": statistics.median(times),
                "step_s_all": times,
                "sample_tokens": toks.shape[1],
                "sample_s": st,
                "sample_tokens_per_s": toks.shape[1] / st,
            }
        )
    )


if __name__ == "__main__":
    main()
