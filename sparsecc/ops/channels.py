"""The Channels rule's computations as sparsecc:: custom ops: the k-channel GEMM of a sliced weight gradient and
the optimizer update of the trained channels, in place.

subtensor_grads and fuse_optimizer emit these only when the graph's tensors take the Triton path (CUDA, or
SPARSECC_TRITON=1; float32/float16/bfloat16): there the generated kernels read the full operands through strides
(no gathered copy). On the CPU path the passes emit plain aten ops instead, so exported graphs stay pure aten; the
CPU implementations below are that same aten math (for opcheck, and for a graph run where SPARSECC_TRITON is off).
    channels_weight_grad(g, x, index, k, dim)   dim="in": g^T @ x[:, channels] [out, k]; "out": g[:, channels]^T @ x
    sgd_rows(param, grad, index, k, dim, momentum_buffer, lr, momentum, weight_decay, nesterov)
    adamw_rows(param, grad, index, k, dim, exp_avg, exp_avg_sq, lr, step, beta1, beta2, eps, weight_decay)
The channels are `index` (int64), or the first k when index is None. The updates train the channels of dim 0 of
any parameter, or of dim 1 of a matrix: the rows of a 2-D view of it. grad and state have the trained part's shape.
"""
from __future__ import annotations

import torch

from ..optim import SGD, AdamW
from . import tuning
from .device import TRITON_DTYPES, triton_kernels, use_triton


def on_triton(t: torch.Tensor) -> bool:
    """Whether the Channels ops above run a generated kernel for tensors like t (a fake value at compile time)."""
    return use_triton(t) and t.dtype in TRITON_DTYPES


def rows_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t as a 2-D view whose rows are the channels of dim (0: any tensor; 1: a matrix)."""
    if dim == 0:
        return t.view(t.shape[0], -1)
    if t.dim() != 2:
        raise ValueError(f"the channels of dim {dim} of a {t.dim()}-D tensor are not the rows of a 2-D view")
    return t.t()


def _channels(t: torch.Tensor, index: torch.Tensor | None, k: int, dim: int) -> torch.Tensor:
    return t.narrow(dim, 0, k) if index is None else t.index_select(dim, index)


@torch.library.custom_op("sparsecc::channels_weight_grad", mutates_args=())
def channels_weight_grad(g: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None, k: int,
                         dim: str) -> torch.Tensor:
    if use_triton(x):
        def kernel():
            return triton_kernels().channels_weight_grad(g, x, k if index is None else index, dim)
        if x.is_cuda:     # on a GPU: the generated kernel or slice + cuBLAS, whichever the cost model measured faster
            if tuning.channels_choice(g, x, k if index is None else index, dim, kernel,
                               lambda: _sliced_weight_grad(g, x, index, k, dim)) == "slice+mm":
                return _sliced_weight_grad(g, x, index, k, dim)
        return kernel()
    return _sliced_weight_grad(g, x, index, k, dim)


def _sliced_weight_grad(g, x, index, k, dim):
    if dim == "in":
        return g.t() @ _channels(x, index, k, 1)
    return _channels(g, index, k, 1).t() @ x


@channels_weight_grad.register_fake
def _(g, x, index, k, dim):
    return g.new_empty((g.shape[1], k) if dim == "in" else (k, x.shape[1]))


def _write(param, index, k, dim, new_part):
    if index is None:
        param.narrow(dim, 0, k).copy_(new_part)
    else:
        param.index_copy_(dim, index, new_part)


@torch.library.custom_op("sparsecc::sgd_rows", mutates_args=("param", "momentum_buffer"))
def sgd_rows(param: torch.Tensor, grad: torch.Tensor, index: torch.Tensor | None, k: int, dim: int,
             momentum_buffer: torch.Tensor | None, lr: torch.Tensor, momentum: float, weight_decay: float,
             nesterov: bool) -> None:
    if use_triton(param):
        buf = None if momentum_buffer is None else rows_view(momentum_buffer, dim)
        triton_kernels().sgd_rows(rows_view(param, dim), rows_view(grad, dim), k if index is None else index, buf,
                                  lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        return
    opt = SGD(lr=0.0, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)   # update() takes lr
    state = () if momentum_buffer is None else (momentum_buffer,)
    new_p, *new_state = opt.update(_channels(param, index, k, dim), grad, lr, None, *state)
    _write(param, index, k, dim, new_p)
    for old, new in zip(state, new_state):
        old.copy_(new)


@sgd_rows.register_fake
def _(param, grad, index, k, dim, momentum_buffer, lr, momentum, weight_decay, nesterov):
    return None


@torch.library.custom_op("sparsecc::adamw_rows", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def adamw_rows(param: torch.Tensor, grad: torch.Tensor, index: torch.Tensor | None, k: int, dim: int,
               exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, lr: torch.Tensor, step: torch.Tensor, beta1: float,
               beta2: float, eps: float, weight_decay: float) -> None:
    if use_triton(param):
        triton_kernels().adamw_rows(rows_view(param, dim), rows_view(grad, dim), k if index is None else index,
                                    rows_view(exp_avg, dim), rows_view(exp_avg_sq, dim), lr=lr, step=step,
                                    betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        return
    opt = AdamW(lr=0.0, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)            # update() takes lr
    new_p, new_avg, new_avg_sq = opt.update(_channels(param, index, k, dim), grad, lr, step, exp_avg, exp_avg_sq)
    _write(param, index, k, dim, new_p)
    exp_avg.copy_(new_avg)
    exp_avg_sq.copy_(new_avg_sq)


@adamw_rows.register_fake
def _(param, grad, index, k, dim, exp_avg, exp_avg_sq, lr, step, beta1, beta2, eps, weight_decay):
    return None
