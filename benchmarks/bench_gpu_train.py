"""GPT training steps on a CUDA GPU: sparse weights through sparsecc vs dense, and a sparse update vs Inductor.

Part "weights": a GPT (d=2048, 4 layers, 8 x 1024 tokens, bf16; --quick: tiny) whose MLP weights are Blocks(64, 0.1)
and qkv weights NM(2, 4, transposable=True); SGD with momentum. Variants:
  dense eager masked      the masked weights trained densely by eager PyTorch (gradients masked after backward)
  dense inductor masked   the same through torch.compile (Inductor)
  sparsecc measure        torch.compile(backend="sparsecc", options={"sparsity": spec}): the cost model measures
                          sparse vs dense on the GPU per shape and rewrites where sparse wins
  sparsecc off            the same with cost_model="off": every candidate rewritten (the sparse kernels' own speed)
Part "update": GPT (d=1024, 6 layers, 8 x 512 tokens, fp32 with TF32) under a sparse-update scheme (biases of the
last two blocks, Channels(0.25) on the last fc1, Channels(0.5, dim="out") on the last fc2, head, final norm), AdamW:
  inductor freezing       torch.compile of the model with requires_grad freezing, torch.optim.AdamW
  sparsecc                sparsecc.compile_train_step (the whole step as one graph; Channels kernels or slices)
Per variant: median step time of 10 (after 3 warm-up steps), its speed relative to the first variant (> 1: faster),
peak memory minus the weights (torch.cuda.max_memory_allocated; the script holds them twice), the first step's
seconds (compilation, cost-model measurements) and, for sparsecc, how many linear calls it rewrote and refused
(with the first refusal's reason).
Without a CUDA GPU it says so and exits 0.

usage: python benchmarks/bench_gpu_train.py [--rounds 10] [--quick] [--only weights|update]
"""
from __future__ import annotations

import copy
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cli

SECTIONS = ("weights", "update")


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d, layers, heads, vocab, seq):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.lnf(x))


def lm_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def batch(b, s, vocab):
    ids = torch.randint(0, vocab, (b, s + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1].cuda(), ids[:, 1:].cuda()


def timed(step, rounds):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3, torch.cuda.max_memory_allocated() / 2**20


def header():
    print(f"{'variant':<26}{'step ms':>10}{'vs first':>10}{'peak MiB':>10}{'first step s':>14}  notes", flush=True)


def line(name, ms, mib, first, base, notes=""):
    print(f"{name:<26}{ms:>10.2f}{base / ms if base else 1.0:>9.2f}x{mib:>10.0f}{first:>14.1f}  {notes}", flush=True)


def sparsecc_notes() -> str:
    import sparsecc
    report = sparsecc.reports()[-1]
    notes = [n for p in report.passes for n in p.notes if "kept dense" in n]
    stats = report.stats
    why = f"; e.g. {notes[0][:200]}" if notes else ""
    return f"rewrote {stats.get('sparse_ops', 0)}, refused {stats.get('sparse_refused', 0)}{why}"


def run_variant(name: str, make_step, rounds: int, weights_mib: float, base_ms: float | None,
                notes=lambda: "") -> float | None:
    """Build a variant's step (make_step() -> a zero-argument step), time its first call and then `rounds` steps,
    print its line; returns its step ms (None if it failed). Everything it built is freed when it returns."""
    try:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        step = make_step()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms, mib = timed(step, rounds)
        line(name, ms, mib - weights_mib, first, base_ms or ms, notes())
        return ms
    except Exception:
        print(f"{name:<26} failed:\n{traceback.format_exc()[-2000:]}", flush=True)
        return None
    finally:
        torch.cuda.empty_cache()


def weights_section(quick: bool, rounds: int):
    import sparsecc
    d, layers, heads, vocab, seq, b = (128, 2, 4, 256, 64, 2) if quick else (2048, 4, 16, 8192, 1024, 8)
    block = 16 if quick else 64
    torch.manual_seed(0)
    base = GPT(d, layers, heads, vocab, seq).cuda().to(torch.bfloat16)
    x, y = batch(b, seq, vocab)
    spec = sparsecc.Sparsity({"blocks.*.fc*.weight": sparsecc.Blocks(block, density=0.1),
                              "blocks.*.qkv.weight": sparsecc.NM(2, 4, transposable=True)})
    weights_mib = 2 * sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20   # base + the copy
    print(f"\nsparse weights: GPT d={d}, {layers} layers, {b}x{seq} tokens, bfloat16; MLP Blocks({block}, 0.1), "
          f"qkv NM(2, 4, transposable=True); SGD momentum; peak minus {weights_mib:.0f} MiB of weights (2 copies)")
    header()

    def variant(name, compile_model):
        def make_step():
            model = copy.deepcopy(base)
            masks = sparsecc.sparsify(model, spec)
            f = compile_model(model)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step():
                lm_loss(f(x), y).backward()
                if name.startswith("dense"):
                    for n, p in model.named_parameters():
                        if n in masks:
                            p.grad.mul_(masks[n])
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        return make_step

    base_ms = None
    for name, compile_model in (
            ("dense eager masked", lambda m: m),
            ("dense inductor masked", lambda m: torch.compile(m)),
            ("sparsecc measure", lambda m: torch.compile(m, backend="sparsecc", options={"sparsity": spec})),
            ("sparsecc off", lambda m: torch.compile(m, backend="sparsecc",
                                                     options={"sparsity": spec, "cost_model": "off"}))):
        notes = sparsecc_notes if name.startswith("sparsecc") else (lambda: "")
        ms = run_variant(name, variant(name, compile_model), rounds, weights_mib, base_ms, notes)
        base_ms = base_ms or ms


def update_section(quick: bool, rounds: int):
    import sparsecc
    torch.backends.cuda.matmul.allow_tf32 = True
    d, layers, heads, vocab, seq, b = (128, 3, 4, 256, 64, 2) if quick else (1024, 6, 16, 8192, 512, 8)
    torch.manual_seed(0)
    base = GPT(d, layers, heads, vocab, seq).cuda()
    x, y = batch(b, seq, vocab)
    last, prev = layers - 1, layers - 2
    scheme = sparsecc.UpdateScheme({f"blocks.{prev}.*.bias": "full", f"blocks.{last}.*.bias": "full",
                                    f"blocks.{last}.fc1.weight": sparsecc.Channels(0.25),
                                    f"blocks.{last}.fc2.weight": sparsecc.Channels(0.5, dim="out"),
                                    "head.*": "full", "lnf.*": "full"}, default="frozen")
    rules = scheme.resolve(dict(base.named_parameters()))
    weights_mib = 2 * sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20   # base + the copy
    print(f"\nsparse update: GPT d={d}, {layers} layers, {b}x{seq} tokens, fp32 (TF32), AdamW; peak minus "
          f"{weights_mib:.0f} MiB of weights (2 copies)")
    header()

    def inductor_freezing():
        model = copy.deepcopy(base)
        for n, p in model.named_parameters():
            p.requires_grad_(rules[n] != "frozen")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        f = torch.compile(model)

        def step():
            lm_loss(f(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sparsecc_step():
        model = copy.deepcopy(base)
        step = sparsecc.compile_train_step(model, lm_loss, optimizer=sparsecc.AdamW(lr=1e-4), update=scheme,
                                           example_inputs=(x, y))
        return lambda: step(x, y)

    base_ms = run_variant("inductor freezing", inductor_freezing, rounds, weights_mib, None)
    run_variant("sparsecc compile_train_step", sparsecc_step, rounds, weights_mib, base_ms)


def main():
    args = cli(__doc__, rounds=10, sections=SECTIONS)
    if not torch.cuda.is_available():
        print("bench_gpu_train: no CUDA GPU here; these training steps need one to be timed. Nothing measured.")
        return 0
    print(f"device {torch.cuda.get_device_name()}")
    if args.only in (None, "weights"):
        weights_section(args.quick, args.rounds)
    if args.only in (None, "update"):
        update_section(args.quick, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
