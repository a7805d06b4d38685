"""Sparse linear layers, forward + backward, on CPU, and a sparse transformer's training step.

Layers: sparsecc's ops (block_sparse_mm / csr_mm with their SDDMM weight gradients) against dense torch
(MKL: three GEMMs) and torch.sparse (BSR or CSR weight; the backward a user would have to write: the input
gradient with the sparse transpose, the weight gradient with torch.sparse.sampled_addmm at the nonzeros).
Step: a GPT (2 blocks, d=512, 1024 tokens) with 10%-dense 32x32 blocks in its MLPs and 25% in attention,
trained with AdamW: eager dense on the masked weights (gradients masked), Inductor on the same, and
sparsecc with its cost model.

usage: python benchmarks/bench_sparse_ops.py [--rounds 3] [--quick] [--only blocks|csr|nm|step]
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common import cli, interleaved_medians
from sparsecc.ops import native
from sparsecc.sparse_weights import SparseWeight
from sparsecc.sparsity import NM, Blocks, Unstructured

warnings.filterwarnings("ignore", ".*Sparse (CSR|BSR) tensor support is in beta.*")
warnings.filterwarnings("ignore", ".*Sparse invariant checks.*")


def layer_case(size, tokens, pattern):
    """The three ways to run fwd+bwd of y = x @ W^T for one sparse weight."""
    w = torch.randn(size, size)
    mask = pattern.mask(w)
    w = w * mask
    sw = SparseWeight.create("bench", pattern, mask, w.dtype)
    values, i = sw.gather(w), sw.index
    x, g = torch.randn(tokens, size), torch.randn(tokens, size)
    block = pattern.size if isinstance(pattern, Blocks) else None
    w_sp = w.to_sparse_bsr((block, block)) if block else w.to_sparse_csr()
    wt_sp = w.t().contiguous().to_sparse_bsr((block, block)) if block else w.t().contiguous().to_sparse_csr()
    ones = mask.float().to_sparse_csr()

    def dense():
        x @ w.T, g @ w, g.T @ x

    sparsecc_ops = sw.format.steps(i, values, x, g, size, size, sw.block)   # the kernels the cost model times

    def torch_sparse():
        torch.sparse.mm(w_sp, x.T)
        torch.sparse.mm(wt_sp, g.T)
        torch.sparse.sampled_addmm(ones, g.T, x, beta=0.0)

    return {"dense": dense, "sparsecc": sparsecc_ops, "torch.sparse": torch_sparse}


def layer_table(title, cases, rounds):
    print(f"\n{title}")
    print(f"{'weight':>10}{'tokens':>8}{'pattern':>22}{'dense ms':>10}{'sparsecc ms':>12}{'torch.sparse ms':>16}"
          f"{'vs dense':>9}{'vs t.sparse':>12}")
    for size, tokens, pattern in cases:
        t = interleaved_medians(layer_case(size, tokens, pattern), rounds, warmup=1)
        name = (f"blocks {pattern.size} d={pattern.density}" if isinstance(pattern, Blocks) else
                f"NM {pattern.n}:{pattern.m}" if isinstance(pattern, NM) else f"unstructured d={pattern.density}")
        print(f"{size:>5}x{size:<4}{tokens:>8}{name:>22}{t['dense'] * 1e3:10.2f}{t['sparsecc'] * 1e3:12.2f}"
              f"{t['torch.sparse'] * 1e3:16.2f}{t['dense'] / t['sparsecc']:8.2f}x"
              f"{t['torch.sparse'] / t['sparsecc']:11.2f}x", flush=True)


def step_table(rounds, quick):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import sparsecc
    from train_sparse_weights import GPT
    d, batch = (128, 2) if quick else (512, 8)
    spec = sparsecc.Sparsity({"blocks.*.fc*.weight": Blocks(32, density=0.1),
                              "blocks.*.qkv.weight": Blocks(32, density=0.25)})
    text = torch.randint(0, 256, (batch, 129))
    ids, targets = text[:, :-1], text[:, 1:]

    def trainer(compile_with):
        torch.manual_seed(0)
        model = GPT(d=d)
        sparsecc.sparsify(model, spec)
        masks = {p: m for n, p in model.named_parameters() if (m := model.sparsecc_masks.get(n)) is not None}
        run = model if compile_with is None else torch.compile(model, **compile_with)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sparse = compile_with is not None and compile_with.get("backend") == "sparsecc"

        def step():
            F.cross_entropy(run(ids).flatten(0, 1), targets.flatten()).backward()
            if not sparse:          # dense training of a sparse model: mask the gradients by hand
                for p, m in masks.items():
                    p.grad.mul_(m)
            opt.step()
            opt.zero_grad()
        return step

    steps = {"eager dense (masked)": trainer(None),
             "inductor dense (masked)": trainer({"backend": "inductor"}),
             "sparsecc": trainer({"backend": "sparsecc", "options": {"sparsity": spec}})}
    t = interleaved_medians(steps, rounds, warmup=2)
    print(f"\ntraining step, GPT 2 blocks d={d}, {batch}x128 tokens, AdamW; MLP blocks 32 at 10%, qkv at 25%")
    for k, v in t.items():
        print(f"{k:>26}{v * 1e3:10.1f} ms   sparsecc {v / t['sparsecc']:.2f}x faster")
    report = sparsecc.reports()[-1]
    print(f"sparsecc rewrote {report.stats['sparse_ops']} calls, kept {report.stats['sparse_refused']} dense")


def main():
    args = cli(__doc__, rounds=3, sections=("blocks", "csr", "nm", "step"))
    only = args.only
    print(f"native C++/OpenMP kernels: {'yes' if native.available() else 'no: ' + str(native.why_unavailable())}")
    sizes = [(256, 64)] if args.quick else [(1024, 256), (1024, 2048), (4096, 256), (4096, 2048)]
    densities = (0.5, 0.1) if args.quick else (0.5, 0.25, 0.1, 0.05)
    if only in (None, "blocks"):
        layer_table("block-sparse (torch.sparse = BSR)",
                    [(s, t, Blocks(b, d)) for s, t in sizes for b in (16, 32) for d in densities], args.rounds)
    if only in (None, "csr"):
        layer_table("unstructured (torch.sparse = CSR)",
                    [(s, t, Unstructured(d)) for s, t in sizes for d in densities], args.rounds)
    if only in (None, "nm"):
        layer_table("2:4 (sparsecc and torch.sparse as CSR)",
                    [(s, t, NM(2, 4)) for s, t in sizes if s == max(x for x, _ in sizes)], args.rounds)
    if only in (None, "step"):
        step_table(args.rounds, args.quick)


if __name__ == "__main__":
    main()
