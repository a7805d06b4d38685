"""Block-sparse linear algebra as sparsecc:: custom ops on plain tensors (torchao style, no torch.sparse layouts).

A weight W [out, in] with square blocks of size b is held as
    values [nnzb, b, b]   the kept blocks
    rows   [nnzb] int64   block-row of each block   (W[rows[k]*b:(rows[k]+1)*b, ...])
    cols   [nnzb] int64   block-column of each block
The ops, each with a fake (shape) implementation:
    block_sparse_mm(x, values, rows, cols, n_out)   y = x @ W^T         x [N, in] -> y [N, n_out]
    block_sparse_mm_t(g, values, rows, cols, n_in)  gx = g @ W          (the input gradient)
    block_sddmm(g, x, rows, cols, b)                gW = (g^T @ x) at the blocks only (the weight gradient)
block_sparse_mm has an autograd formula made of the other two, so pruned entries never receive a gradient.
The CPU kernels run one small GEMM per kept block on strided views of the dense operands, so work and
memory traffic are proportional to the kept blocks. On a GPU the weight gradient runs the generated SDDMM kernel or
cuBLAS's dense GEMM with the kept blocks gathered from it, whichever measured faster for the shape
(tuning.sddmm_choice; the N:M and CSR weight gradients choose the same way).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import native, tuning
from .device import triton_kernels, use_triton


def block_index(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the size x size blocks of a 2-D mask that hold any set entry, row-major."""
    out, inp = mask.shape
    grid = mask.reshape(out // size, size, inp // size, size).any(3).any(1)
    return grid.nonzero(as_tuple=True)


def to_blocks(weight: torch.Tensor, mask: torch.Tensor, size: int):
    """(values, rows, cols) of the blocks of weight where the block mask (constant per block) is set."""
    rows, cols = block_index(mask, size)
    return block_values(weight, rows, cols, size).contiguous(), rows, cols


def block_values(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """The [nnzb, size, size] blocks of a 2-D weight at (rows, cols) (differentiable: graphs gather with it)."""
    out, inp = weight.shape
    return weight.reshape(out // size, size, inp // size, size).permute(0, 2, 1, 3)[rows, cols]


def from_blocks(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape) -> torch.Tensor:
    """The dense weight the blocks describe (zeros elsewhere)."""
    out, inp = shape
    b = values.shape[-1]
    dense = values.new_zeros(out // b, inp // b, b, b)
    dense[rows, cols] = values
    return dense.permute(0, 2, 1, 3).reshape(out, inp)


def _spmm(x, values, dst, src, n_dst):
    """y[:, dst[k]] += x[:, src[k]] @ values[k]^T for every block k; x [N, n_src], y [N, n_dst].

    The C++/OpenMP kernel when it is built; else one small GEMM per block on strided views (no gathered
    copies of x): measured 3-10x faster than gathering the blocks' slices for one batched GEMM."""
    if use_triton(x):
        return triton_kernels().block_spmm(x, values, dst, src, n_dst)
    if native.usable(x):
        return native.block_spmm(x, values, dst, src, n_dst)
    b = values.shape[-1]
    y = x.new_zeros(x.shape[0], n_dst)
    vt = values.transpose(1, 2)
    for k, (d, s) in enumerate(zip(dst.tolist(), src.tolist())):
        y[:, d * b:(d + 1) * b].addmm_(x[:, s * b:(s + 1) * b], vt[k])
    return y


@torch.library.custom_op("sparsecc::block_sparse_mm", mutates_args=())
def block_sparse_mm(x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    n_out: int) -> torch.Tensor:
    return _spmm(x, values, rows, cols, n_out)


@torch.library.custom_op("sparsecc::block_sparse_mm_t", mutates_args=())
def block_sparse_mm_t(g: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      n_in: int) -> torch.Tensor:
    return _spmm(g, values.transpose(1, 2), cols, rows, n_in)


@torch.library.custom_op("sparsecc::block_sddmm", mutates_args=())
def block_sddmm(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    if use_triton(g):
        def kernel():
            return triton_kernels().block_sddmm(g, x, rows, cols, b)

        def gemm():                 # the dense GEMM and a gather of the kept blocks
            return block_values(g.t() @ x, rows, cols, b)
        return gemm() if tuning.sddmm_choice("block_sddmm", (g, x, rows, cols, b), kernel, gemm) == "gemm" \
            else kernel()
    if native.usable(g):
        return native.block_sddmm(g, x, rows, cols, b)
    out = g.new_empty(rows.shape[0], b, b)
    gt = g.t()
    for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        torch.mm(gt[r * b:(r + 1) * b], x[:, c * b:(c + 1) * b], out=out[k])
    return out


@block_sparse_mm.register_fake
def _(x, values, rows, cols, n_out):
    return x.new_empty(x.shape[0], n_out)


@block_sparse_mm_t.register_fake
def _(g, values, rows, cols, n_in):
    return g.new_empty(g.shape[0], n_in)


@block_sddmm.register_fake
def _(g, x, rows, cols, b):
    return g.new_empty(rows.shape[0], b, b)


def _setup(ctx, inputs, output):
    x, values, rows, cols, _ = inputs
    ctx.save_for_backward(x, values, rows, cols)


def _backward(ctx, grad):
    x, values, rows, cols = ctx.saved_tensors
    gx = block_sparse_mm_t(grad, values, rows, cols, x.shape[1]) if ctx.needs_input_grad[0] else None
    gv = block_sddmm(grad, x, rows, cols, values.shape[-1]) if ctx.needs_input_grad[1] else None
    return gx, gv, None, None, None


block_sparse_mm.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.sparsecc.block_sparse_mm)
def _(x_shape, values_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * values_shape[0] * values_shape[1] * values_shape[2]


@register_flop_formula(torch.ops.sparsecc.block_sparse_mm_t)
def _(g_shape, values_shape, *args, **kwargs) -> int:
    return 2 * g_shape[0] * values_shape[0] * values_shape[1] * values_shape[2]


@register_flop_formula(torch.ops.sparsecc.block_sddmm)
def _(g_shape, x_shape, rows_shape, cols_shape, b, **kwargs) -> int:
    return 2 * g_shape[0] * rows_shape[0] * b * b
