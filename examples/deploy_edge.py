"""Deploy a compiled sparse training step: save it, train from it in a process that has no model code, and
run the same step as an aarch64 program under qemu-user (the edge-CPU path).

1. A small GPT (the class lives only in this script) gets 25%-dense 16x16 blocks in its MLPs and 2:4 in its
   attention projections, and a PockEngine-style scheme (biases, norms, the sparse MLP up-projections).
2. compile_train_step trains it for a few steps; step.save writes finetune.sparsecc with host, x86_64 and
   aarch64 programs.
3. `sparsecc inspect` shows what is inside; `sparsecc run` continues training in a fresh interpreter.
4. The aarch64 module trains under qemu-aarch64 with IREE's aarch64 runtime and matches the x86_64 module.

usage: python examples/deploy_edge.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
from sparsecc.cli import inspect


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=64, d=128, heads=4, layers=2, seq=32):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def loss_fn(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def task(n, batch=8, seq=32, vocab=64, seed=0):
    """Token translation: the target of each token is a fixed random permutation of it (a stand-in for a
    domain the pre-trained model does not know)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    ids = torch.randint(0, vocab, (n, batch, seq), generator=g)
    return [(ids[i], perm[ids[i]]) for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="deploy_out")
    out = Path(ap.parse_args().out).resolve()
    out.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = TinyGPT()
    sparsecc.sparsify(model, sparsecc.Sparsity({"blocks.*.up.weight": sparsecc.Blocks(16, 0.25),
                                                "blocks.*.down.weight": sparsecc.Blocks(16, 0.25),
                                                "blocks.*.[qkv].weight": sparsecc.NM(2, 4)}))
    scheme = sparsecc.UpdateScheme({"blocks.*.k.bias": "frozen", "*.bias": "full", "*ln*": "full",
                                    "blocks.*.up.weight": "full", "blocks.1.o.weight": sparsecc.Channels(0.25)})
    data = task(40)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(1e-2), update=scheme,
                                       example_inputs=data[0])
    print("1. training in this process (compile_train_step):")
    for i, (x, y) in enumerate(data[:24]):
        loss = step(x, y)
        if i % 4 == 3:
            print(f"   step {i + 1}: loss {loss.item():.4f}")

    path = out / "finetune.sparsecc"
    sparsecc.save(step, path, targets=["host", "x86_64", "aarch64"])
    print(f"\n2. saved {path} ({path.stat().st_size / 1e3:.0f} KB)\n")
    print(inspect(str(path)))

    np.savez(out / "batches.npz", x=torch.stack([x for x, _ in data[24:]]).numpy(),
             y=torch.stack([y for _, y in data[24:]]).numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    print("\n3. `sparsecc run` in a fresh interpreter (TinyGPT is defined nowhere it can import):")
    subprocess.run([sys.executable, "-m", "sparsecc.cli", "run", str(path), "--data", str(out / "batches.npz"),
                    "--steps", "16"], check=True, env=env, cwd=out)

    print("\n4. the same artifact on aarch64:")
    if shutil.which("qemu-aarch64") is None:
        print("   qemu-aarch64 is not installed; run scripts/install-edge-tools (Debian) and try again")
        return
    x86 = sparsecc.load(path, target="x86_64" if platform.machine() == "x86_64" else "host")
    arm = sparsecc.load(path, target="aarch64", iree_run_module=sparsecc.export.fetch_iree_run_module("aarch64"))
    for i, (x, y) in enumerate(data[:3]):
        a, b = arm.train_step(x, y), x86.train_step(x, y)
        print(f"   step {i + 1}: aarch64 (qemu, IREE) loss {a.item():.6f}   x86_64 (IREE) {b.item():.6f}")
    worst = max((arm.parameters()[n] - p).abs().max().item() for n, p in x86.parameters().items())
    print(f"   largest parameter difference after 3 steps: {worst:.2e}")


if __name__ == "__main__":
    main()
