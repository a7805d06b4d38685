"""Sparse linear layer y = x @ W^T on CPU, float32: forward + backward (y, the input gradient g @ W and the weight
gradient at W's nonzeros) by six implementations measured side by side:
    dense         three torch mm (MKL) on the dense weight
    per-block     block_sparse.py's PyTorch fallback (SPARSECC_NATIVE=0): one addmm per kept block (blocks only)
    c++           sparsecc.ops.native: hand-written C++/OpenMP kernels
    torch.sparse  the weight as BSR (blocks) or CSR: torch.sparse.mm forward, W^T as sparse @ g, and
                  torch.sparse.sampled_addmm on the CSR pattern (BSR has no CPU sampled_addmm)
    inductor      torch.compile of dense compute on the compressed blocks: gather, bmm, index_add (blocks only)
    mlir          torch-mlir: sparse tensor encodings (BSR or CSR) -> MLIR sparsifier -> ExecutionEngine JIT, one
                  thread (the sparsifier emits serial loops unless built with an OpenMP runtime)
Index structures (BSR/CSR of W and of W^T) are built once, outside the timed step; the step rebuilds from the
weight's values whatever depends on them, as a training step would (for CSR that is a gather of W's values into
W^T's order, part of every CSR time). Patterns come from sparsecc.sparsity. Compilation (Inductor, MLIR) happens in
an untimed first step. A full run takes about 20 minutes, most of it in mlir's serial kernels.

usage: python benchmarks/compare_cpu_kernels.py [--rounds 3] [--quick]
"""
from __future__ import annotations

import ctypes
import os
import time
import warnings

import torch

from common import cli, interleaved_medians
from sparsecc.ops import native
from sparsecc.ops.block_sparse import _spmm, block_sddmm, to_blocks
from sparsecc.sparsity import NM, Blocks, Unstructured

warnings.filterwarnings("ignore", message="Sparse .*(beta state|invariant checks)")  # torch.sparse's notices
warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)  # from torch-mlir's export
IMPLS = ["dense", "per-block", "c++", "torch.sparse", "inductor", "mlir"]


class Layer:
    """A pruned weight [n, n], its structures, and the activations of one step."""

    def __init__(self, n, tokens, pattern):
        w = torch.randn(n, n)
        self.mask = pattern.mask(w)
        self.w, self.n, self.pattern = w * self.mask, n, pattern
        self.x, self.g = torch.randn(tokens, n), torch.randn(tokens, n)
        self.csr = self.w.to_sparse_csr()
        self.crow, self.col = self.csr.crow_indices(), self.csr.col_indices()
        rows = torch.repeat_interleave(torch.arange(n), self.crow.diff())
        self.perm = torch.argsort(self.col * n + rows)  # W's nonzeros in W^T's CSR order
        self.crow_t = torch.cat([self.col.new_zeros(1), torch.bincount(self.col, minlength=n).cumsum(0)])
        self.col_t = rows[self.perm]
        self.pattern_csr = torch.sparse_csr_tensor(self.crow, self.col, torch.ones(self.col.shape[0]), (n, n))
        if isinstance(pattern, Blocks):
            self.b = pattern.size
            self.values, self.rows, self.cols = to_blocks(self.w, self.mask, self.b)
            bsr, bsr_t = self.w.to_sparse_bsr((self.b, self.b)), self.w.T.to_sparse_bsr((self.b, self.b))
            self.bcrow, self.bcol = bsr.crow_indices(), bsr.col_indices()
            self.bcrow_t, self.bcol_t = bsr_t.crow_indices(), bsr_t.col_indices()
            self.bperm = torch.argsort(self.cols * (n // self.b) + self.rows)  # blocks in W^T's BSR order

    @property
    def blocks(self):
        return isinstance(self.pattern, Blocks)


def dense(L):
    return lambda: (L.x @ L.w.T, L.g @ L.w, L.g.T @ L.x)


def per_block(L):
    if not L.blocks:
        return None

    def step():
        before = os.environ.get("SPARSECC_NATIVE")
        os.environ["SPARSECC_NATIVE"] = "0"  # block_sparse.py's PyTorch fallback instead of the C++ kernels
        try:
            return (_spmm(L.x, L.values, L.rows, L.cols, L.n), _spmm(L.g, L.values.transpose(1, 2), L.cols, L.rows, L.n),
                    block_sddmm(L.g, L.x, L.rows, L.cols, L.b))
        finally:
            if before is None:
                del os.environ["SPARSECC_NATIVE"]
            else:
                os.environ["SPARSECC_NATIVE"] = before
    return step


def cpp(L):
    if L.blocks:
        return lambda: (native.block_spmm(L.x, L.values, L.rows, L.cols, L.n),
                        native.block_spmm(L.g, L.values.transpose(1, 2), L.cols, L.rows, L.n),
                        native.block_sddmm(L.g, L.x, L.rows, L.cols, L.b))
    vals = L.csr.values()
    return lambda: (native.csr_spmm(L.x, L.crow, L.col, vals, L.n),
                    native.csr_spmm(L.g, L.crow_t, L.col_t, vals[L.perm], L.n),
                    native.csr_sddmm(L.g, L.x, L.crow, L.col))


def sparse_weights(L):
    """W and W^T as torch.sparse BSR (block patterns) or CSR tensors, from the current values."""
    shape = (L.n, L.n)
    if L.blocks:
        return (torch.sparse_bsr_tensor(L.bcrow, L.bcol, L.values, shape),
                torch.sparse_bsr_tensor(L.bcrow_t, L.bcol_t, L.values.transpose(1, 2)[L.bperm], shape))
    return (torch.sparse_csr_tensor(L.crow, L.col, L.csr.values(), shape),
            torch.sparse_csr_tensor(L.crow_t, L.col_t, L.csr.values()[L.perm], shape))


def torch_sparse(L):
    def step():
        w, w_t = sparse_weights(L)
        return (w @ L.x.T).T, (w_t @ L.g.T).T, torch.sparse.sampled_addmm(L.pattern_csr, L.g.T, L.x, beta=0.0)
    return step


@torch.compile(dynamic=True)
def _blocks_bmm(x, g, values, rows, cols):
    """Dense compute on the compressed blocks: gathered [nnzb, N, b] slices of x and g, one bmm per product."""
    n, b = x.shape[1], values.shape[-1]
    xb = x.unflatten(1, (-1, b)).transpose(0, 1)[cols]
    gb = g.unflatten(1, (-1, b)).transpose(0, 1)[rows]
    y = x.new_zeros(n // b, x.shape[0], b).index_add_(0, rows, torch.bmm(xb, values.transpose(1, 2)))
    gx = x.new_zeros(n // b, x.shape[0], b).index_add_(0, cols, torch.bmm(gb, values))
    return y.transpose(0, 1).flatten(1), gx.transpose(0, 1).flatten(1), torch.bmm(gb.transpose(1, 2), xb)


def inductor(L):
    if not L.blocks:
        return None
    return lambda: _blocks_bmm(L.x, L.g, L.values, L.rows, L.cols)


class _MM(torch.nn.Module):
    def forward(self, a, b):
        return a @ b


class _SDDMM(torch.nn.Module):
    def forward(self, pattern, gt, x):
        return pattern * (gt @ x)


class _Mlir:
    """torch-mlir's sparsifier, as in /work/shared/recipes/torch_mlir_sparse.py: a module with a sparse operand is
    imported with its #sparse_tensor.encoding, lowered by the `sparsifier` pipeline and JIT-compiled; it is called
    with memref descriptors of numpy views (sparse operands as positions, coordinates, values)."""

    def __init__(self):
        import numpy as np
        from torch_mlir import fx, ir, passmanager
        from torch_mlir.execution_engine import ExecutionEngine
        from torch_mlir.runtime import np_to_memref

        self.fx, self.ir, self.passmanager, self.ExecutionEngine = fx, ir, passmanager, ExecutionEngine
        self.memref = np_to_memref
        self.free = ctypes.CDLL(None).free  # results are malloc'ed by the compiled code and owned by the caller
        self.free.argtypes = [ctypes.c_void_p]
        f32, i64 = np_to_memref.as_ctype(np.float32), ctypes.c_int64
        self.dense2d = np_to_memref.make_nd_memref_descriptor(2, f32)

        class SparseResult(ctypes.Structure):  # sparse-assembler{direct-out}: positions, coordinates, values
            _fields_ = [("pos", np_to_memref.make_nd_memref_descriptor(1, i64)),
                        ("crd", np_to_memref.make_nd_memref_descriptor(1, i64)),
                        ("val", np_to_memref.make_nd_memref_descriptor(1, f32))]
        self.SparseResult = SparseResult

    def compile(self, module, *args):
        mod = self.fx.export_and_import(module, *args, output_type="linalg-on-tensors", func_name="main")
        with mod.context:
            for op in mod.body.operations:
                if op.operation.name == "func.func":
                    op.attributes["llvm.emit_c_interface"] = self.ir.UnitAttr.get()
            self.passmanager.PassManager.parse(
                "builtin.module(sparse-assembler{direct-out=true},"
                "sparsifier{create-sparse-deallocs=1 enable-runtime-library=false})").run(mod.operation)
        return self.ExecutionEngine(mod, opt_level=3)

    def call(self, engine, result, *tensors):
        """Runs engine on the tensors (sparse ones expanded to their arrays) and frees what it returned."""
        arrays = []
        for t in tensors:
            parts = (t.crow_indices(), t.col_indices(), t.values()) if t.layout != torch.strided else (t,)
            arrays += [p.contiguous().numpy() for p in parts]
        descs = [ctypes.pointer(ctypes.pointer(self.memref.get_ranked_memref_descriptor(a))) for a in arrays]
        engine.invoke("main", ctypes.pointer(ctypes.pointer(result)), *descs)
        for d in (result.pos, result.crd, result.val) if isinstance(result, self.SparseResult) else (result,):
            self.free(d.allocated)

    def step(self, L):
        mm = self.compile(_MM(), L.x, sparse_weights(L)[1])  # y = x @ (W^T as sparse); g @ W: the same shapes
        sddmm = self.compile(_SDDMM(), L.pattern_csr, L.g.T.contiguous(), L.x)
        y, gx, gw = self.dense2d(), self.dense2d(), self.SparseResult()

        def step():
            w, w_t = sparse_weights(L)
            self.call(mm, y, L.x, w_t)
            self.call(mm, gx, L.g, w)
            self.call(sddmm, gw, L.pattern_csr, L.g.T.contiguous(), L.x)
        return step


def mlir_backend():
    """The torch-mlir runner, or the reason it cannot run here."""
    try:
        return _Mlir()
    except Exception as e:  # noqa: BLE001 (any import or load failure is a reason to report)
        return f"torch-mlir unavailable: {type(e).__name__}: {e}"


def main():
    args = cli(__doc__, rounds=3)
    torch._dynamo.config.recompile_limit = 64
    t0 = time.perf_counter()
    ok = native.available()
    print(f"c++ kernels built or loaded in {time.perf_counter() - t0:.1f} s" if ok
          else f"c++ kernels unavailable: {native.why_unavailable()}")
    mlir = mlir_backend()
    if isinstance(mlir, str):
        print(mlir)
    shapes = [(256, 64), (256, 16)] if args.quick else [(4096, 2048), (4096, 256), (1024, 2048), (1024, 256)]
    patterns = [Blocks(32, 0.1), Blocks(32, 0.05), Blocks(16, 0.1), Blocks(16, 0.05), Unstructured(0.1),
                Unstructured(0.5)]
    cases = [(n, t, p) for n, t in shapes for p in patterns] + [(n, t, NM(2, 4)) for n, t in shapes if n == shapes[0][0]]
    print(f"\nforward + backward ms (median of {args.rounds}); 'c++ x' = time of the fastest other / c++ time")
    print(f"{'pattern':>14}{'weight':>11}{'tokens':>7}" + "".join(f"{k:>13}" for k in IMPLS) + f"{'fastest':>14}{'c++ x':>7}")
    for n, tokens, pattern in cases:
        L = Layer(n, tokens, pattern)
        steps, cells = {}, {}
        makers = {"dense": dense, "per-block": per_block, "c++": cpp, "torch.sparse": torch_sparse,
                  "inductor": inductor, "mlir": (lambda L: mlir.step(L)) if not isinstance(mlir, str) else None}
        for name, make in makers.items():
            try:
                step = make(L) if make else None
                if step is not None:
                    step()  # compiles, and fails here rather than inside the timing
                    steps[name] = step
                else:
                    cells[name] = "n/a" if make else "unavailable"
            except Exception as e:  # noqa: BLE001 (a failing implementation is a table entry, not a crash)
                cells[name] = "error"
                print(f"  {name} failed on {pattern} {n}x{n} {tokens} tokens: {type(e).__name__}: {str(e)[:200]}")
        t = interleaved_medians(steps, args.rounds, warmup=0)  # each step already ran once above
        cells.update({k: f"{v * 1e3:.1f}" for k, v in t.items()})
        fastest = min(t, key=t.get)
        others = min((v for k, v in t.items() if k != "c++"), default=float("nan"))
        ratio = others / t["c++"] if "c++" in t else float("nan")
        name = {Blocks: lambda p: f"b{p.size} d={p.density}", Unstructured: lambda p: f"csr d={p.density}",
                NM: lambda p: f"{p.n}:{p.m}"}[type(pattern)](pattern)
        print(f"{name:>14}{f'{n}x{n}':>11}{tokens:>7}" + "".join(f"{cells[k]:>13}" for k in IMPLS)
              + f"{fastest:>14}{ratio:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
