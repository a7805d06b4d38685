"""Launchers: the Python functions that pick a kernel variant for a call, generate it and run it.

Each launcher takes the operands in sparsecc's formats (the same arguments as the CPU kernel of sparsecc.ops.native
where one exists), finds the target of the tensors' device, takes that target's row of the tuning table shrunk
to the call's shape class, generates the template specialised on dtype, pattern and tiles, and launches it.
Tensors must be on a CUDA or ROCm device, or anywhere under TRITON_INTERPRET=1 (the tests run CPU tensors).
Dense operands and values are float32, float16 or bfloat16 (one dtype per call); indices int64 (others are
converted). Results have the operands' dtype; accumulation is in fp32.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton

from . import templates
from .configs import config, next_pow2
from .generator import generate, interpreting

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_planning: tuple[str, list[templates.Source]] | None = None   # set inside planned()


@contextlib.contextmanager
def planned(target: str):
    """Inside `with planned("sm_90") as sources:` launchers launch nothing and append to `sources` the kernel
    sources they would launch on that target (their results are left uninitialised). The tests compile these
    ahead of time: the variants a GPU would run for the calls the interpreter checked."""
    global _planning
    outer, _planning = _planning, (target, [])
    try:
        yield _planning[1]
    finally:
        _planning = outer


def target_of(device: torch.device) -> str:
    """The tuning-table row for tensors on `device`: "interpreter" under TRITON_INTERPRET=1, else the GPU's."""
    if _planning is not None:
        return _planning[0]
    if interpreting():
        return "interpreter"
    if device.type != "cuda":
        raise RuntimeError(f"sparsecc's Triton kernels run on CUDA/ROCm tensors, got {device} "
                           "(set TRITON_INTERPRET=1 before triton is imported to run them in Triton's interpreter)")
    if torch.version.hip:
        return "gfx942"       # the documented AMD target; other CDNA/RDNA GPUs use its row
    major, minor = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_87" if (major, minor) == (8, 7) else "sm_80"


def _dtype(*tensors: torch.Tensor) -> str:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or tensors[0].dtype not in _DTYPES:
        raise TypeError(f"sparsecc Triton kernels need operands of one dtype among float32, float16, bfloat16; "
                        f"got {sorted(map(str, dtypes))}")
    return _DTYPES[tensors[0].dtype]


def _matmul_variant(target: str, *tensors: torch.Tensor) -> dict:
    """dtype, the interpreter's bf16 upcast, and fp32 tl.dot precision (tf32 only if torch allows it)."""
    dtype = _dtype(*tensors)
    tf32 = dtype == "fp32" and target != "interpreter" and torch.backends.cuda.matmul.allow_tf32
    return {"dtype": dtype, "upcast": target == "interpreter" and dtype == "bf16",
            "precision": "tf32" if tf32 else "ieee"}


def _index(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def _run(source: templates.Source, grid: tuple[int, ...], args: tuple, cfg: dict) -> None:
    if _planning is not None:
        _planning[1].append(source)
        return
    generate(source).fn[grid](*args, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# --- block-sparse ----------------------------------------------------------------------------------------------

def block_spmm(x: torch.Tensor, values: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, n_dst: int) -> torch.Tensor:
    """y [N, n_dst]: y[:, dst[k]*b:+b] += x[:, src[k]*b:+b] @ values[k]^T. Forward of x @ W^T: (x, values, rows,
    cols, n_out); input gradient g @ W: (g, values.transpose(1, 2), cols, rows, n_in) (read through strides)."""
    n, b = x.shape[0], values.shape[-1]
    target = target_of(x.device)
    variant = _matmul_variant(target, x, values)
    if n == 0 or values.shape[0] == 0:
        return x.new_zeros(n, n_dst)
    sorted_dst, order = torch.sort(_index(dst), stable=True)       # searchsorted, unlike bincount, needs no host sync
    ptr = torch.searchsorted(sorted_dst, torch.arange(n_dst // b + 1, device=x.device))
    cfg = config("block_spmm", target, BLOCK_M=n)
    y = x.new_empty(n, n_dst)
    _run(templates.block_spmm(b=b, BLOCK_M=cfg["BLOCK_M"], **variant), (n_dst // b, triton.cdiv(n, cfg["BLOCK_M"])),
         (x, values, y, ptr, order, _index(src), n, *x.stride(), *values.stride(), *y.stride()), cfg)
    return y


def block_sddmm(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """out [nnzb, b, b]: out[k] = g[:, rows[k]*b:+b]^T @ x[:, cols[k]*b:+b]."""
    target = target_of(x.device)
    variant = _matmul_variant(target, g, x)
    out = x.new_empty(rows.shape[0], b, b)
    if rows.shape[0] == 0:
        return out
    if g.shape[0] == 0:
        return out.zero_()
    cfg = config("block_sddmm", target, BLOCK_K=g.shape[0])
    _run(templates.block_sddmm(b=b, BLOCK_K=cfg["BLOCK_K"], **variant), (rows.shape[0],),
         (g, x, out, _index(rows), _index(cols), g.shape[0], *g.stride(), *x.stride()), cfg)
    return out


# --- CSR -------------------------------------------------------------------------------------------------------

def csr_spmm(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_out: int,
             perm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T, W [n_out, x.shape[1]] in CSR. The input gradient g @ W is csr_spmm(g, t_crow, t_col, values,
    n_in, perm=t_perm): W^T's CSR reading W's values through t_perm (no permuted copy)."""
    n = x.shape[0]
    target = target_of(x.device)
    dtype = _dtype(x, values)
    y = x.new_empty(n, n_out)
    if n == 0 or n_out == 0:
        return y
    per_row = math.ceil(col.shape[0] / n_out)
    cfg = config("csr_spmm", target, BLOCK_M=n, BLOCK_K=per_row)
    extra = (_index(perm),) if perm is not None else ()
    _run(templates.csr_spmm(dtype, cfg["BLOCK_M"], cfg["BLOCK_K"], permuted=perm is not None),
         (n_out, triton.cdiv(n, cfg["BLOCK_M"])),
         (x, values.contiguous(), _index(crow), _index(col), *extra, y, n, *x.stride(), *y.stride()), cfg)
    return y


def csr_sddmm(g: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """vals [nnz]: vals[p] = sum_t g[t, row(p)] * x[t, col[p]]."""
    target = target_of(x.device)
    dtype = _dtype(g, x)
    n_out, nnz = crow.shape[0] - 1, col.shape[0]
    out = x.new_empty(nnz)
    if nnz == 0:
        return out
    cfg = config("csr_sddmm", target, BLOCK_N=math.ceil(nnz / n_out), BLOCK_K=g.shape[0])
    _run(templates.csr_sddmm(dtype, cfg["BLOCK_N"], cfg["BLOCK_K"]), (n_out,),
         (g, x, _index(crow), _index(col), out, g.shape[0], *g.stride(), *x.stride()), cfg)
    return out


# --- N:M -------------------------------------------------------------------------------------------------------

def _nm(n_in: int, k: int, m: int) -> tuple[int, int]:
    """(n, groups) of an N:M weight with K = n_in * n / m entries per row."""
    if n_in % m or (k * m) % n_in:
        raise ValueError(f"an N:M weight with {n_in} inputs and {k} entries per row cannot have M = {m}")
    return k * m // n_in, n_in // m


def _window(cfg: dict, key: str, m: int) -> dict:
    """A tile edge over input columns holds at least one whole (padded) group."""
    return {**cfg, key: max(cfg[key], next_pow2(m))}


def nm_mm(x: torch.Tensor, values2d: torch.Tensor, col2d: torch.Tensor, n_out: int, *, m: int) -> torch.Tensor:
    """y = x @ W^T for W [n_out, x.shape[1]] keeping n of every m inputs (n from values2d's width)."""
    num, n_in = x.shape
    n, groups = _nm(n_in, values2d.shape[1], m)
    target = target_of(x.device)
    variant = _matmul_variant(target, x, values2d)
    y = x.new_zeros(num, n_out)
    if num == 0 or n_out == 0 or n_in == 0:
        return y
    cfg = _window(config("nm_mm", target, BLOCK_M=num, BLOCK_N=n_out, BLOCK_K=n_in), "BLOCK_K", m)
    col2d = _index(col2d)
    _run(templates.nm_mm(n=n, m=m, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **variant),
         (triton.cdiv(n_out, cfg["BLOCK_N"]), triton.cdiv(num, cfg["BLOCK_M"])),
         (x, values2d, col2d, *values2d.stride(), *col2d.stride(), y, num, n_out, groups,
          *x.stride(), *y.stride()), cfg)
    return y


def nm_mm_t(g: torch.Tensor, values2d: torch.Tensor, col2d: torch.Tensor, n_in: int, *, m: int) -> torch.Tensor:
    """gx = g @ W (the input gradient) for the N:M weight W [g.shape[1], n_in]."""
    num, n_out = g.shape
    n, groups = _nm(n_in, values2d.shape[1], m)
    target = target_of(g.device)
    variant = _matmul_variant(target, g, values2d)
    y = g.new_zeros(num, n_in)
    if num == 0 or n_out == 0 or n_in == 0:
        return y
    cfg = _window(config("nm_mm_t", target, BLOCK_M=num, BLOCK_N=n_in, BLOCK_K=n_out), "BLOCK_N", m)
    col2d = _index(col2d)
    _run(templates.nm_mm_t(n=n, m=m, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                           **variant),
         (triton.cdiv(groups, cfg["BLOCK_N"] // next_pow2(m)), triton.cdiv(num, cfg["BLOCK_M"])),
         (g, values2d, col2d, *values2d.stride(), *col2d.stride(), y, num, n_out, groups, *g.stride(), *y.stride()),
         cfg)
    return y


def nm_sddmm(g: torch.Tensor, x: torch.Tensor, col2d: torch.Tensor, *, m: int) -> torch.Tensor:
    """vals2d [n_out, K]: vals2d[r, j] = sum_t g[t, r] * x[t, col2d[r, j]] (the weight gradient at the nonzeros)."""
    num, n_in = x.shape
    n_out, k = col2d.shape
    n, groups = _nm(n_in, k, m)
    target = target_of(x.device)
    variant = _matmul_variant(target, g, x)
    out = x.new_zeros(n_out, k)
    if num == 0 or out.numel() == 0:
        return out
    cfg = _window(config("nm_sddmm", target, BLOCK_M=n_out, BLOCK_N=n_in, BLOCK_K=num), "BLOCK_N", m)
    col2d = _index(col2d)
    _run(templates.nm_sddmm(n=n, m=m, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                            **variant),
         (triton.cdiv(n_out, cfg["BLOCK_M"]), triton.cdiv(groups, cfg["BLOCK_N"] // next_pow2(m))),
         (g, x, col2d, *col2d.stride(), out, num, n_out, groups, *g.stride(), *x.stride()), cfg)
    return out


# --- Channels --------------------------------------------------------------------------------------------------

def channels_weight_grad(g: torch.Tensor, x: torch.Tensor, idx_or_k: torch.Tensor | int,
                         dim: str = "in") -> torch.Tensor:
    """The gradient of the trained slice of a Channels weight, read from the full g [N, out] and x [N, C]:
    dim="in": g^T @ x[:, idx] -> [out, k]; dim="out": g[:, idx]^T @ x -> [k, C]. idx_or_k is an int64 index of
    the k channels, or k for the first k channels (a strided window, no gather)."""
    if dim not in ("in", "out"):
        raise ValueError(f'dim must be "in" or "out", got {dim!r}')
    target = target_of(x.device)
    variant = _matmul_variant(target, g, x)
    indexed = isinstance(idx_or_k, torch.Tensor)
    k = idx_or_k.shape[0] if indexed else int(idx_or_k)
    rows, cols = (g.shape[1], k) if dim == "in" else (k, x.shape[1])
    out = x.new_zeros(rows, cols)
    if g.shape[0] == 0 or out.numel() == 0:
        return out
    side = ("b" if dim == "in" else "a") if indexed else None
    cfg = config("channels_wgrad", target, BLOCK_M=rows, BLOCK_N=cols, BLOCK_K=g.shape[0])
    extra = (_index(idx_or_k),) if indexed else ()
    _run(templates.channels_wgrad(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], index=side,
                                  **variant),
         (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_N"])),
         (g, x, *extra, out, g.shape[0], rows, cols, *g.stride(), *x.stride()), cfg)
    return out


# --- fused optimizer updates -----------------------------------------------------------------------------------

def _rows(param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor | int, *state: torch.Tensor):
    """(dtype, k, the index arguments) of an update of rows of the 2-D param."""
    if param.dim() != 2:
        raise ValueError(f"param must be a 2-D view, got shape {tuple(param.shape)}")
    k = rows.shape[0] if isinstance(rows, torch.Tensor) else int(rows)
    for t in (grad, *state):
        if tuple(t.shape) != (k, param.shape[1]):
            raise ValueError(f"gradient and state must be [{k}, {param.shape[1]}], got {tuple(t.shape)}")
    return _dtype(param, grad, *state), k, ((_index(rows),) if isinstance(rows, torch.Tensor) else ())


def _scalar(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32)
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def sgd_rows(param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor | int,
             momentum_buffer: torch.Tensor | None = None, *, lr: float | torch.Tensor, momentum: float = 0.0,
             weight_decay: float = 0.0, nesterov: bool = False) -> None:
    """torch.optim.SGD (no dampening) on param[rows] (rows: an int64 index, or k for the first k rows), in place,
    with grad and momentum_buffer [k, C] (the buffer starting at zero equals torch's first-step copy)."""
    if bool(momentum) != (momentum_buffer is not None):
        raise ValueError("momentum_buffer is needed exactly when momentum != 0")
    if nesterov and not momentum:
        raise ValueError("nesterov needs momentum > 0")
    state = (momentum_buffer,) if momentum else ()
    dtype, k, index = _rows(param, grad, rows, *state)
    if k == 0 or param.shape[1] == 0:
        return
    target = target_of(param.device)
    cfg = config("sgd_rows", target, BLOCK_N=param.shape[1])
    device_lr = isinstance(lr, torch.Tensor)
    buf = (momentum_buffer, *momentum_buffer.stride()) if momentum else ()
    _run(templates.sgd_rows(dtype, cfg["BLOCK_M"], cfg["BLOCK_N"], indexed=bool(index), momentum=bool(momentum),
                            nesterov=nesterov, weight_decay=bool(weight_decay), device_lr=device_lr),
         (triton.cdiv(k, cfg["BLOCK_M"]), triton.cdiv(param.shape[1], cfg["BLOCK_N"])),
         (param, grad, *index, k, param.shape[1], *param.stride(), *grad.stride(), *buf,
          _scalar(lr, param.device) if device_lr else float(lr), float(momentum), float(weight_decay)), cfg)


def adamw_rows(param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor | int, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, *, lr: float | torch.Tensor, step: float | torch.Tensor,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> None:
    """torch.optim.AdamW (amsgrad=False) on param[rows], in place, with grad, exp_avg, exp_avg_sq [k, C].
    `step` is this update's step number (1 for the first), a float or a 0-d tensor; lr a float or 0-d tensor."""
    dtype, k, index = _rows(param, grad, rows, exp_avg, exp_avg_sq)
    if exp_avg.stride() != exp_avg_sq.stride():
        raise ValueError("exp_avg and exp_avg_sq must have the same strides")
    if k == 0 or param.shape[1] == 0:
        return
    beta1, beta2 = betas
    device_scalars = isinstance(lr, torch.Tensor) or isinstance(step, torch.Tensor)
    if device_scalars:
        log2 = [math.log2(b) if b > 0 else -math.inf for b in betas]
        scalars = (_scalar(lr, param.device), _scalar(step, param.device), float(weight_decay), *log2)
    else:   # as torch.optim.AdamW computes them: Python floats
        scalars = (1 - lr * weight_decay, lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5)
    target = target_of(param.device)
    cfg = config("adamw_rows", target, BLOCK_N=param.shape[1])
    _run(templates.adamw_rows(dtype, cfg["BLOCK_M"], cfg["BLOCK_N"], indexed=bool(index),
                              device_scalars=device_scalars),
         (triton.cdiv(k, cfg["BLOCK_M"]), triton.cdiv(param.shape[1], cfg["BLOCK_N"])),
         (param, grad, *index, k, param.shape[1], *param.stride(), *grad.stride(), exp_avg, exp_avg_sq,
          *exp_avg.stride(), *scalars, 1 - beta1, beta2, 1 - beta2, eps), cfg)
