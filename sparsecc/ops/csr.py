"""Unstructured (and N:M) sparse linear algebra as sparsecc:: custom ops on plain CSR tensors.

A weight W [out, in] is held as
    values [nnz]                 the kept entries, row-major
    crow   [out + 1] int64       row pointers; col [nnz] int64 their columns
and, for the input gradient, the CSR of W^T over the same values:
    t_crow [in + 1], t_col [nnz], t_perm [nnz]   (W^T's k-th entry is values[t_perm[k]])
The ops, each with a fake (shape) implementation:
    csr_mm(x, values, crow, col, t_crow, t_col, t_perm, n_out)  y = x @ W^T         x [N, in] -> [N, n_out]
    csr_mm_t(g, values, t_crow, t_col, t_perm, n_in)            gx = g @ W          (the input gradient)
    csr_sddmm(g, x, crow, col)                                  gW at the nonzeros only (the weight gradient)
csr_mm's autograd formula is made of the other two, so pruned entries never receive a gradient.

N:M weights use this format too, through ops that also take M:
    nm_mm(x, values, crow, col, t_crow, t_col, t_perm, n_out, m)   y = x @ W^T
    nm_mm_t(g, values, col, t_crow, t_col, t_perm, n_in, m)         gx = g @ W
    nm_sddmm(g, x, crow, col, m)                                    gW at the nonzeros only
Every row of an N:M support holds the same count K = in * N / M, sorted by column, so values and col reshape
to the ELL layout [out, K] the generated N:M kernels read: that is what these ops run on the Triton path. On the
CPU they run exactly the csr_ ops' kernels on the same operands.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import register_flop_formula

from . import native
from . import semi_structured, tuning
from .device import triton_kernels, use_triton


def to_csr(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The index tensors of the CSR structure of a 2-D boolean mask and of its transpose, plus `flat`
    (row * in + col of every entry: where values come from in the flattened weight)."""
    out, inp = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)
    t_order = torch.argsort(cols * out + rows)
    return {"flat": rows * inp + cols,
            "crow": _pointers(rows, out), "col": cols,
            "t_crow": _pointers(cols[t_order], inp), "t_col": rows[t_order], "t_perm": t_order}


def _pointers(sorted_rows: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(sorted_rows, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _sparse(crow, col, values, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _spmm(x, values, crow, col, n_out, perm=None):
    """x @ W^T with W [n_out, x.shape[1]] in CSR; its k-th stored value is values[perm[k]] when perm is given."""
    if use_triton(x):
        return triton_kernels().csr_spmm(x, crow, col, values, n_out, perm=perm)
    if perm is not None:
        values = values[perm]
    if native.usable(x):
        return native.csr_spmm(x, crow, col, values, n_out)
    return (_sparse(crow, col, values, (n_out, x.shape[1])) @ x.t()).t().contiguous()


@torch.library.custom_op("sparsecc::csr_mm", mutates_args=())
def csr_mm(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, t_crow: torch.Tensor,
           t_col: torch.Tensor, t_perm: torch.Tensor, n_out: int) -> torch.Tensor:
    return _spmm(x, values, crow, col, n_out)


@torch.library.custom_op("sparsecc::csr_mm_t", mutates_args=())
def csr_mm_t(g: torch.Tensor, values: torch.Tensor, t_crow: torch.Tensor, t_col: torch.Tensor,
             t_perm: torch.Tensor, n_in: int) -> torch.Tensor:
    return _spmm(g, values, t_crow, t_col, n_in, perm=t_perm)


def _sddmm(g, x, crow, col):
    """vals [nnz]: (g^T @ x) at the nonzeros of the CSR structure (crow, col)."""
    if use_triton(x):
        def kernel():
            return triton_kernels().csr_sddmm(g, x, crow, col)

        def gemm():                 # the dense GEMM and a gather of the nonzeros
            rows = torch.repeat_interleave(torch.arange(g.shape[1], device=g.device), crow.diff(),
                                           output_size=col.shape[0])
            return (g.t() @ x)[rows, col]
        return gemm() if tuning.sddmm_choice("csr_sddmm", (g, x, crow, col), kernel, gemm) == "gemm" else kernel()
    if native.usable(x):
        return native.csr_sddmm(g, x, crow, col)
    pattern = _sparse(crow, col, x.new_ones(col.shape[0]), (g.shape[1], x.shape[1]))
    return torch.sparse.sampled_addmm(pattern, g.t().contiguous(), x.contiguous(), beta=0.0).values().clone()


@torch.library.custom_op("sparsecc::csr_sddmm", mutates_args=())
def csr_sddmm(g: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    return _sddmm(g, x, crow, col)


def _ell(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A flat N:M operand (values or col, row-major) as its ELL layout [rows, K]."""
    return t.view(rows, t.shape[0] // max(rows, 1))


def _sparse_tensor_cores(x: torch.Tensor, n_out: int, n_in: int, n: int, m: int) -> str | None:
    """How the cost model decided this N:M weight runs on this GPU: "semi"/"semiT" (2:4 sparse tensor cores, see
    ops/semi_structured.py) or None (the generated N:M kernels)."""
    if not x.is_cuda:
        return None
    return tuning.nm_choice(x.device, x.dtype, n_out, n_in, n, m)


@torch.library.custom_op("sparsecc::nm_mm", mutates_args=())
def nm_mm(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, t_crow: torch.Tensor,
          t_col: torch.Tensor, t_perm: torch.Tensor, n_out: int, m: int) -> torch.Tensor:
    if use_triton(x):
        values2d, col2d = _ell(values, n_out), _ell(col, n_out)
        if _sparse_tensor_cores(x, n_out, x.shape[1], values2d.shape[1] * m // max(x.shape[1], 1), m):
            return semi_structured.mm(x, values2d, col2d, x.shape[1])
        return triton_kernels().nm_mm(x, values2d, col2d, n_out, m=m)
    return _spmm(x, values, crow, col, n_out)


@torch.library.custom_op("sparsecc::nm_mm_t", mutates_args=())
def nm_mm_t(g: torch.Tensor, values: torch.Tensor, col: torch.Tensor, t_crow: torch.Tensor, t_col: torch.Tensor,
            t_perm: torch.Tensor, n_in: int, m: int) -> torch.Tensor:
    if use_triton(g):
        values2d, col2d = _ell(values, g.shape[1]), _ell(col, g.shape[1])
        if _sparse_tensor_cores(g, g.shape[1], n_in, values2d.shape[1] * m // max(n_in, 1), m) == "semiT":
            return semi_structured.mm_t(g, values2d, col2d, n_in)
        return triton_kernels().nm_mm_t(g, values2d, col2d, n_in, m=m)
    return _spmm(g, values, t_crow, t_col, n_in, perm=t_perm)


@torch.library.custom_op("sparsecc::nm_sddmm", mutates_args=())
def nm_sddmm(g: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, m: int) -> torch.Tensor:
    if use_triton(x):
        col2d = _ell(col, g.shape[1])

        def kernel():
            return triton_kernels().nm_sddmm(g, x, col2d, m=m).view(-1)

        def gemm():                 # the dense GEMM and a gather of each row's K nonzeros
            return (g.t() @ x).gather(1, col2d).view(-1)
        return gemm() if tuning.sddmm_choice("nm_sddmm", (g, x, crow, col, m), kernel, gemm) == "gemm" else kernel()
    return _sddmm(g, x, crow, col)


@csr_mm.register_fake
def _(x, values, crow, col, t_crow, t_col, t_perm, n_out):
    return x.new_empty(x.shape[0], n_out)


@nm_mm.register_fake
def _(x, values, crow, col, t_crow, t_col, t_perm, n_out, m):
    return x.new_empty(x.shape[0], n_out)


@csr_mm_t.register_fake
def _(g, values, t_crow, t_col, t_perm, n_in):
    return g.new_empty(g.shape[0], n_in)


@nm_mm_t.register_fake
def _(g, values, col, t_crow, t_col, t_perm, n_in, m):
    return g.new_empty(g.shape[0], n_in)


@csr_sddmm.register_fake
def _(g, x, crow, col):
    return g.new_empty(col.shape[0])


@nm_sddmm.register_fake
def _(g, x, crow, col, m):
    return g.new_empty(col.shape[0])


def _setup(ctx, inputs, output):
    x, values, crow, col, t_crow, t_col, t_perm, _, *m = inputs
    ctx.save_for_backward(x, values, crow, col, t_crow, t_col, t_perm)
    ctx.m = m                        # [M] for nm_mm, [] for csr_mm


def _backward(ctx, grad):
    x, values, crow, col, t_crow, t_col, t_perm = ctx.saved_tensors
    gx = gv = None
    if ctx.needs_input_grad[0]:
        gx = nm_mm_t(grad, values, col, t_crow, t_col, t_perm, x.shape[1], *ctx.m) if ctx.m else \
            csr_mm_t(grad, values, t_crow, t_col, t_perm, x.shape[1])
    if ctx.needs_input_grad[1]:
        gv = nm_sddmm(grad, x, crow, col, *ctx.m) if ctx.m else csr_sddmm(grad, x, crow, col)
    return gx, gv, *[None] * (6 + len(ctx.m))


csr_mm.register_autograd(_backward, setup_context=_setup)
nm_mm.register_autograd(_backward, setup_context=_setup)


@register_flop_formula([torch.ops.sparsecc.csr_mm, torch.ops.sparsecc.csr_mm_t, torch.ops.sparsecc.nm_mm,
                        torch.ops.sparsecc.nm_mm_t])
def _(x_shape, values_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * values_shape[0]


@register_flop_formula([torch.ops.sparsecc.csr_sddmm, torch.ops.sparsecc.nm_sddmm])
def _(g_shape, x_shape, crow_shape, col_shape, *args, **kwargs) -> int:
    return 2 * g_shape[0] * col_shape[0]
