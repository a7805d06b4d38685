"""Training with sparse weights: a small GPT whose MLP weights keep 10% of their 32x32 blocks, whose attention
qkv projections keep 25% of theirs and whose attention output projections are 2:4, trained with RigL (the MLP
masks move every few steps without recompiling). The cost model measures, per layer shape, whether the sparse
kernels beat the dense ones on this machine (once; cached); the report lists each rewrite (format, density,
FLOPs saved) and each refusal with its measurement.

usage: python examples/train_sparse_weights.py [--steps 30] [--d 512] [--html sparse_report.html]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.ln1, self.ln2 = heads, nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=256, d=512, heads=8, layers=2, seq=128):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids) + self.pos[: ids.shape[1]]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--html", default="sparse_report.html")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(d=args.d)
    spec = sparsecc.Sparsity({"blocks.*.fc*.weight": sparsecc.Blocks(32, density=0.1),
                              "blocks.*.qkv.weight": sparsecc.Blocks(32, density=0.25),
                              "blocks.*.proj.weight": sparsecc.NM(2, 4)})
    sparsecc.sparsify(model, spec)
    dyn = sparsecc.DynamicSparsity("rigl", every=10, end_step=args.steps, drop_fraction=0.3,
                                   params="blocks.*.fc*.weight")      # the 2:4 weights keep their masks
    compiled = torch.compile(model, backend="sparsecc", options={"sparsity": spec})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    text = torch.randint(0, 256, (8, 129))     # a fixed random "corpus": the model learns to memorise it
    ids, targets = text[:, :-1], text[:, 1:]

    def loss_of(m):
        return F.cross_entropy(m(ids).flatten(0, 1), targets.flatten())

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = loss_of(compiled)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if dyn.due(step):
            moved = dyn.step(model, step, opt, grads=dyn.dense_grads(model, lambda: loss_of(model)))
            print(f"step {step}: RigL moved {sum(moved.values()):,} entries (no recompilation)")
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(sparsecc.reports()[0])
    sparsecc.reports()[0].save_html(args.html)
    print(f"wrote {args.html}")


if __name__ == "__main__":
    main()
