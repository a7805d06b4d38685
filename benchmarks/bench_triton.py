"""sparsecc's generated Triton kernels on a CUDA/ROCm device, against cuBLAS dense and torch.sparse's BSR Triton ops.

Per kernel: median time, TFLOP/s of the useful (nonzero) work, and speedups over (a "fwd+grads" row times the
forward, input gradient and weight gradient together, as issue 13's goals are stated)
  dense     the same product with the dense masked weight through cuBLAS/rocBLAS (torch.mm)
  bsr       torch.sparse._triton_ops (bsr_dense_mm for the products, sampled_addmm for the weight gradient),
            for block-sparse weights
  csr       torch.sparse CSR (cuSPARSE: CSR @ dense, sampled_addmm), for unstructured weights
  2:4       torch.sparse's semi-structured 2:4 tensor (sparse tensor cores) for the 2:4 forward, where the GPU
            and the shape support it
Block-sparse kernels are autotuned at their first call per shape class (a few configurations timed once, cached in
$SPARSECC_CACHE_DIR/triton/tuning-*.json); the warm-up steps include that. "op" rows time the sparsecc:: ops graphs
call, whose weight gradient is the SDDMM kernel or cuBLAS's dense GEMM with the kept entries gathered, whichever
measured faster at the op's first call; "fwd+grads" rows time the ops. The N:M section also times sparsecc's 2:4
sparse-tensor-core path (forward; input gradient of a transposable 2:4 weight), which compresses W at every call.
The Channels weight gradient is compared with a gathered slice fed to torch.mm, as the generated kernel and as the
sparsecc op graphs call (the kernel or slice + cuBLAS, whichever the cost model measured faster); the fused
optimizer updates with
torch.optim's foreach update of the gathered rows (index_select, update, index_copy_), in GB/s of parameter, grad
and state traffic. The SwiGLU backward in place (swiglu_backward_in_place's two kernels: d_gate into up, d_up into g)
is compared with the two gradients computed by Inductor's fused kernel (torch.compile) and by eager PyTorch, at a
6.7 B Llama's MLP width (11008) over the section's tokens, in TB/s of the minimal traffic (three tensors read, two
written). Without a GPU it says so and exits 0: the kernels' correctness is tested in the interpreter
(tests/test_triton_kernels.py), not here.

Each section runs in bf16, then fp16 (bf16 only with --quick; SPARSECC_BENCH_DTYPES=bfloat16,float16 chooses).

usage: python benchmarks/bench_triton.py [--rounds 20] [--quick] [--only blocks|csr|nm|channels|optim|swiglu]
"""
from __future__ import annotations

import os
import sys
import warnings
from functools import partial

import torch
import torch.nn.functional as F

from common import cli, interleaved_medians

SECTIONS = ("blocks", "csr", "nm", "channels", "optim", "swiglu")
warnings.filterwarnings("ignore", ".*Sparse (CSR|BSR) tensor support is in beta.*")


def synced(steps: dict) -> dict:
    """Each step followed by a device synchronisation, so wall-clock medians time the kernels."""
    def wrap(fn):
        def step():
            fn()
            torch.cuda.synchronize()
        return step
    return {k: wrap(fn) for k, fn in steps.items()}


def row(label: str, work: float, t: dict, ours: str = "sparsecc", unit: str = "TFLOP/s"):
    """One table line: our time and rate (work: FLOPs, or bytes for unit TB/s), then each baseline's time and our
    speedup over it."""
    others = "".join(f" {k:>11}{v * 1e3:9.3f} ms {v / t[ours]:6.2f}x" for k, v in t.items() if k != ours)
    print(f"{label:<32}{t[ours] * 1e3:9.3f} ms {work / t[ours] / 1e12:8.2f} {unit:<8}{others}", flush=True)


def block_section(T, size, tokens, dtype, rounds):
    from sparsecc.ops.block_sparse import to_blocks
    from torch.sparse import _triton_ops as bsr_ops
    print(f"\nblock-sparse W {size}x{size}, {tokens} tokens, {dtype}; "
          "speedups: dense (cuBLAS), bsr (torch.sparse Triton)")
    for b in (64, 32, 16):                 # the goals' shapes first (a time-limited run keeps them)
        for density in (0.1, 0.5):
            grid = torch.rand(size // b, size // b, device="cuda") < density
            mask = grid.repeat_interleave(b, 0).repeat_interleave(b, 1)
            w = torch.randn(size, size, device="cuda", dtype=dtype) * mask
            values, rows, cols = to_blocks(w, mask, b)
            x, g = (torch.randn(tokens, size, device="cuda", dtype=dtype) for _ in range(2))
            w_bsr, wt_bsr = w.to_sparse_bsr(b), w.t().contiguous().to_sparse_bsr(b)
            pattern = mask.to(dtype).to_sparse_bsr(b)
            nnz_flops = 2 * tokens * values.numel()
            name = f"b={b} density={density}"
            row(f"forward {name}", nnz_flops, interleaved_medians(synced({
                "sparsecc": lambda: T.block_spmm(x, values, rows, cols, size),
                "dense": lambda: x @ w.t(),
                "bsr": lambda: bsr_ops.bsr_dense_mm(w_bsr, x.t())}), rounds))
            row(f"input grad {name}", nnz_flops, interleaved_medians(synced({
                "sparsecc": lambda: T.block_spmm(g, values.transpose(1, 2), cols, rows, size),
                "dense": lambda: g @ w,
                "bsr": lambda: bsr_ops.bsr_dense_mm(wt_bsr, g.t())}), rounds))
            row(f"weight grad {name}", nnz_flops, interleaved_medians(synced({
                "sparsecc": lambda: T.block_sddmm(g, x, rows, cols, b),
                "dense": lambda: g.t() @ x,
                "bsr": lambda: bsr_ops.sampled_addmm(pattern, g.t(), x, beta=0.0)}), rounds))
            op = torch.ops.sparsecc            # what graphs call: the weight gradient as kernel or GEMM + gather
            row(f"weight grad op {name}", nnz_flops, interleaved_medians(synced({
                "sparsecc": lambda: op.block_sddmm(g, x, rows, cols, b),
                "kernel": lambda: T.block_sddmm(g, x, rows, cols, b), "dense": lambda: g.t() @ x}), rounds))
            row(f"fwd+grads {name}", 3 * nnz_flops, interleaved_medians(synced({    # issue 13's goal
                "sparsecc": lambda: (op.block_sparse_mm(x, values, rows, cols, size),
                                     op.block_sparse_mm_t(g, values, rows, cols, size),
                                     op.block_sddmm(g, x, rows, cols, b)),
                "dense": lambda: (x @ w.t(), g @ w, g.t() @ x)}), rounds))


def available(name: str, make) -> dict:
    """{name: make()} if that baseline builds and runs here, else {} with a note (this GPU, dtype or shape has
    no support for it)."""
    try:
        fn = make()
        fn()
    except (RuntimeError, NotImplementedError, ValueError) as e:
        print(f"  ({name} not measured: {str(e).splitlines()[0][:120]})")
        return {}
    return {name: fn}


def csr_section(T, size, tokens, dtype, rounds):
    from sparsecc.ops.csr import to_csr
    print(f"\nunstructured W {size}x{size}, {tokens} tokens, {dtype}; speedups: dense (cuBLAS), csr (cuSPARSE)")
    for density in (0.1, 0.02):
        mask = torch.rand(size, size, device="cuda") < density
        w = torch.randn(size, size, device="cuda", dtype=dtype) * mask
        i = to_csr(mask)
        values = w.flatten()[i["flat"]]
        x, g = (torch.randn(tokens, size, device="cuda", dtype=dtype) for _ in range(2))
        w_csr, wt_csr, pattern = w.to_sparse_csr(), w.t().contiguous().to_sparse_csr(), mask.to(dtype).to_sparse_csr()
        flops = 2 * tokens * values.numel()
        row(f"forward density={density}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.csr_spmm(x, i["crow"], i["col"], values, size), "dense": lambda: x @ w.t(),
            **available("csr", lambda: partial(torch.mm, w_csr, x.t()))}), rounds))
        row(f"input grad density={density}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.csr_spmm(g, i["t_crow"], i["t_col"], values, size, perm=i["t_perm"]),
            "dense": lambda: g @ w, **available("csr", lambda: partial(torch.mm, wt_csr, g.t()))}), rounds))
        row(f"weight grad density={density}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.csr_sddmm(g, x, i["crow"], i["col"]), "dense": lambda: g.t() @ x,
            **available("csr", lambda: partial(torch.sparse.sampled_addmm, pattern, g.t(), x, beta=0.0))}), rounds))


def nm_section(T, size, tokens, dtype, rounds):
    from sparsecc.ops.csr import to_csr
    from sparsecc.sparsity import NM
    from torch.sparse import to_sparse_semi_structured
    print(f"\nN:M W {size}x{size}, {tokens} tokens, {dtype}; speedups: dense (cuBLAS), 2:4 (semi-structured)")
    for n, m in ((2, 4), (1, 4), (2, 8)):
        w = torch.randn(size, size, device="cuda", dtype=dtype)
        mask = NM(n, m, transposable=(n, m) == (2, 4)).mask(w.float())     # 2:4: W^T is 2:4 too
        w = w * mask
        i = to_csr(mask)
        k = size * n // m
        values2d, col2d = w.flatten()[i["flat"]].view(size, k), i["col"].view(size, k)
        x, g = (torch.randn(tokens, size, device="cuda", dtype=dtype) for _ in range(2))
        flops = 2 * tokens * values2d.numel()
        semi = available("2:4", lambda: partial(F.linear, x, to_sparse_semi_structured(w))) if (n, m) == (2, 4) else {}
        row(f"forward {n}:{m}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.nm_mm(x, values2d, col2d, size, m=m), "dense": lambda: x @ w.t(), **semi}), rounds))
        row(f"input grad {n}:{m}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.nm_mm_t(g, values2d, col2d, size, m=m), "dense": lambda: g @ w}), rounds))
        row(f"weight grad {n}:{m}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.nm_sddmm(g, x, col2d, m=m), "dense": lambda: g.t() @ x}), rounds))
        op_wgrad = partial(torch.ops.sparsecc.nm_sddmm, g, x, i["crow"], i["col"], m)   # kernel or GEMM + gather
        row(f"weight grad op {n}:{m}", flops, interleaved_medians(synced({
            "sparsecc": op_wgrad, "kernel": lambda: T.nm_sddmm(g, x, col2d, m=m), "dense": lambda: g.t() @ x}),
            rounds))
        if (n, m) == (2, 4):               # sparsecc's sparse-tensor-core path (compresses W at every call)
            from sparsecc.ops import semi_structured
            usable, why = semi_structured.available(x.device, dtype)
            if not usable:
                print(f"  (2:4 sparse tensor cores not measured: {why})")
                continue
            semi_t = available("2:4", lambda: partial(F.linear, g, to_sparse_semi_structured(w.t().contiguous())))
            row("forward 2:4 tensor cores", flops, interleaved_medians(synced({
                "sparsecc": lambda: semi_structured.mm(x, values2d, col2d, size), "dense": lambda: x @ w.t(),
                "N:M kernel": lambda: T.nm_mm(x, values2d, col2d, size, m=m), **semi}), rounds))
            row("input grad 2:4T tensor cores", flops, interleaved_medians(synced({
                "sparsecc": lambda: semi_structured.mm_t(g, values2d, col2d, size), "dense": lambda: g @ w,
                "N:M kernel": lambda: T.nm_mm_t(g, values2d, col2d, size, m=m), **semi_t}), rounds))
            row("fwd+grads 2:4T (TC + wgrad op)", 3 * flops, interleaved_medians(synced({   # the goal
                "sparsecc": lambda: (semi_structured.mm(x, values2d, col2d, size),
                                     semi_structured.mm_t(g, values2d, col2d, size), op_wgrad()),
                "dense": lambda: (x @ w.t(), g @ w, g.t() @ x),
                "TC + SDDMM": lambda: (semi_structured.mm(x, values2d, col2d, size),
                                       semi_structured.mm_t(g, values2d, col2d, size), T.nm_sddmm(g, x, col2d, m=m)),
                "N:M kernels": lambda: (T.nm_mm(x, values2d, col2d, size, m=m),
                                        T.nm_mm_t(g, values2d, col2d, size, m=m), T.nm_sddmm(g, x, col2d, m=m))}),
                rounds))


def channels_section(T, size, tokens, dtype, rounds):
    print(f"\nChannels weight gradient, W {size}x{size}, {tokens} tokens, {dtype}; speedup: gathered slice + torch.mm")
    x, g = (torch.randn(tokens, size, device="cuda", dtype=dtype) for _ in range(2))
    for fraction in (0.25, 0.05):
        k = max(1, int(fraction * size))
        idx = torch.randperm(size, device="cuda")[:k]
        flops = 2 * tokens * size * k
        row(f"dim=in first {k}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.channels_weight_grad(g, x, k, "in"), "slice+mm": lambda: g.t() @ x[:, :k]}), rounds))
        row(f"dim=in index of {k}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.channels_weight_grad(g, x, idx, "in"),
            "slice+mm": lambda: g.t() @ x[:, idx]}), rounds))
        row(f"dim=out index of {k}", flops, interleaved_medians(synced({
            "sparsecc": lambda: T.channels_weight_grad(g, x, idx, "out"),
            "slice+mm": lambda: g[:, idx].t() @ x}), rounds))
        op = torch.ops.sparsecc.channels_weight_grad       # what graphs call: the kernel or slice + cuBLAS, measured
        for label, args in ((f"op dim=in first {k}", (None, k, "in")), (f"op dim=in index of {k}", (idx, k, "in")),
                            (f"op dim=out index of {k}", (idx, k, "out"))):
            sliced = (lambda a=args: g.t() @ (x[:, :k] if a[0] is None else x[:, idx])) if args[2] == "in" else \
                (lambda: g[:, idx].t() @ x)
            row(label, flops, interleaved_medians(synced({"sparsecc": lambda a=args: op(g, x, *a),
                                                          "slice+mm": sliced}), rounds))


def optim_section(T, size, dtype, rounds):
    print(f"\nfused optimizer updates over trained rows of a {size}x{size} {dtype} parameter; "
          "speedup: torch.optim foreach on gathered rows")
    p = torch.randn(size, size, device="cuda", dtype=dtype)
    for fraction in (0.25, 0.05):
        k = max(1, int(fraction * size))
        rows = torch.randperm(size, device="cuda")[:k]
        grad = torch.randn(k, size, device="cuda", dtype=dtype)
        m1, m2, buf = (torch.zeros(k, size, device="cuda", dtype=dtype) for _ in range(3))
        trained = p[rows].clone()
        sgd = torch.optim.SGD([trained], lr=1e-3, momentum=0.9, foreach=True)
        adamw = torch.optim.AdamW([trained], lr=1e-3, foreach=True)
        trained.grad = grad

        def torch_step(opt):
            trained.copy_(p.index_select(0, rows))
            opt.step()
            p.index_copy_(0, rows, trained)

        elt = p.element_size()
        row(f"SGD momentum, {k} rows", 5 * k * size * elt, interleaved_medians(synced({
            "sparsecc": lambda: T.sgd_rows(p, grad, rows, buf, lr=1e-3, momentum=0.9),
            "torch": lambda: torch_step(sgd)}), rounds), unit="TB/s")
        row(f"AdamW, {k} rows", 7 * k * size * elt, interleaved_medians(synced({
            "sparsecc": lambda: T.adamw_rows(p, grad, rows, m1, m2, lr=1e-3, step=1.0),
            "torch": lambda: torch_step(adamw)}), rounds), unit="TB/s")


def swiglu_gradients(g, gate, up):
    s = torch.sigmoid(gate.float())
    return ((g.float() * up.float() * s * (1 + gate.float() * (1 - s))).to(g.dtype),
            (g.float() * gate.float() * s).to(g.dtype))


def swiglu_section(T, tokens, width, dtype, rounds):
    print(f"\nthe SwiGLU backward over [{tokens}, {width}] {dtype}: in place (d_gate into up, d_up into g) vs the "
          "two gradients allocated fresh")
    g, gate, up = (torch.randn(tokens, width, device="cuda", dtype=dtype) for _ in range(3))
    fused = torch.compile(swiglu_gradients)
    fused(g, gate, up)

    def in_place():
        T.swiglu_backward(up, g, gate, "gate")
        T.swiglu_backward(g, g, gate, "up")
    row("SwiGLU backward", 5 * g.numel() * g.element_size(), interleaved_medians(synced({
        "sparsecc": in_place, "inductor": lambda: fused(g, gate, up),
        "eager": lambda: swiglu_gradients(g, gate, up)}), rounds), unit="TB/s")


def main():
    args = cli(__doc__, rounds=20, sections=SECTIONS)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA or ROCm device here; the generated Triton kernels need a GPU to be timed "
              "(their correctness is checked in the interpreter by tests/test_triton_kernels.py). Nothing measured.")
        return 0
    try:
        from sparsecc.codegen import triton as T
    except ImportError as e:
        print(f"bench_triton: triton is not installed ({e}); nothing measured.")
        return 0
    size, tokens = (512, 256) if args.quick else (4096, 4096)
    print(f"device {torch.cuda.get_device_name()}, sparsecc target {T.target_of(torch.device('cuda'))}")
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float16)
    if os.environ.get("SPARSECC_BENCH_DTYPES"):          # e.g. "bfloat16" (scripts/gpu_check.py's time budget)
        dtypes = tuple(getattr(torch, name) for name in os.environ["SPARSECC_BENCH_DTYPES"].split(","))
    for dtype in dtypes:
        sections = {"blocks": lambda: block_section(T, size, tokens, dtype, args.rounds),
                    "csr": lambda: csr_section(T, size, tokens, dtype, args.rounds),
                    "nm": lambda: nm_section(T, size, tokens, dtype, args.rounds),
                    "channels": lambda: channels_section(T, size, tokens, dtype, args.rounds),
                    "optim": lambda: optim_section(T, size, dtype, args.rounds),
                    "swiglu": lambda: swiglu_section(T, tokens // 2 if args.quick else 2048,
                                                     1376 if args.quick else 11008, dtype, args.rounds)}
        for name, run in sections.items():
            if args.only in (None, name):
                run()
    print(f"\n{len(T.generated_sources())} kernel variants generated and timed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
