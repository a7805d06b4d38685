"""Block-sparse linear layer, forward + backward, on CPU: sparsecc's block_sparse_mm against dense torch (MKL)
and torch.sparse BSR (forward by torch.sparse.mm on the BSR weight; backward as a user would write it:
a dense mm for the input gradient and a dense weight gradient masked to the blocks).

usage: python benchmarks/bench_sparse_ops.py [--rounds 5] [--quick]
"""
from __future__ import annotations

import torch

from common import cli, interleaved_medians
from sparsecc.ops.block_sparse import to_blocks
from sparsecc.sparsity import Blocks

ops = torch.ops.sparsecc


def case(size, tokens, b, density):
    w = torch.randn(size, size)
    mask = Blocks(b, density).mask(w)
    w = w * mask
    values, rows, cols = to_blocks(w, mask, b)
    x = torch.randn(tokens, size)
    g = torch.randn(tokens, size)
    bsr = w.to_sparse_bsr((b, b))

    def dense():
        xr, wr = x.requires_grad_(), w.clone().requires_grad_()
        (xr @ wr.T).backward(g)

    def sparsecc_op():
        xr, vr = x.requires_grad_(), values.clone().requires_grad_()
        ops.block_sparse_mm(xr, vr, rows, cols, size).backward(g)

    def torch_sparse():
        y = torch.sparse.mm(bsr, x.T).T                     # forward on the BSR weight
        gx = g @ w                                         # input gradient: dense
        gw = (g.T @ x) * mask                              # weight gradient: dense, then masked
        return y, gx, gw

    return {"dense": dense, "sparsecc": sparsecc_op, "torch.sparse": torch_sparse}


def main():
    args = cli(__doc__, rounds=5)
    sizes = [(512, 256)] if args.quick else [(1024, 256), (1024, 2048), (4096, 256), (4096, 2048)]
    print(f"{'weight':>10}{'tokens':>8}{'block':>6}{'density':>8}{'dense ms':>10}{'sparsecc ms':>12}"
          f"{'torch.sparse ms':>16}{'vs dense':>9}{'vs t.sparse':>12}")
    for size, tokens in sizes:
        for b in (16, 32):
            for density in (0.5, 0.25, 0.1, 0.05):
                t = interleaved_medians(case(size, tokens, b, density), args.rounds, warmup=1)
                print(f"{size:>5}x{size:<4}{tokens:>8}{b:>6}{density:>8.2f}{t['dense'] * 1e3:10.2f}"
                      f"{t['sparsecc'] * 1e3:12.2f}{t['torch.sparse'] * 1e3:16.2f}"
                      f"{t['dense'] / t['sparsecc']:8.2f}x{t['torch.sparse'] / t['sparsecc']:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
