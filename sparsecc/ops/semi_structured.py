"""2:4 weights on sparse tensor cores, through torch's semi-structured sparsity (cuSPARSELt or CUTLASS).

Feature-detected, never assumed: `available(device, dtype)` says whether torch.sparse.to_sparse_semi_structured runs
here (a CUDA GPU of compute capability 8.0+, float16/bfloat16, a torch that has it) by compressing and multiplying
a small 2:4 matrix once per device and dtype, and gives the reason when it does not. The cost model measures this
path against the generated N:M kernels and dense GEMMs on the GPU and records which one a 2:4 weight uses
(tuning.nm_choice, recorded by the cost model); the N:M ops (ops/csr.py) then call:
    forward      y = x @ W^T   = F.linear(x, compress(W))          W is 2:4 along its rows
    input grad   gx = g @ W    = F.linear(g, compress(W^T))        needs W^T 2:4 too: NM(2, 4, transposable=True)
The weight gradient stays an SDDMM at the kept entries (the generated nm_sddmm kernel). The weight is compressed
at every call (its values change every step); that time is part of what the cost model measures.
Not tested on a GPU in this repository's CI (there is none): only the feature check's refusals are.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

DTYPES = (torch.float16, torch.bfloat16)


def available(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """(True, "") where 2:4 sparse tensor cores run for this device and dtype, else (False, why not)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, (f"2:4 sparse tensor cores need a CUDA GPU of compute capability 8.0+ (the weights are on "
                       f"{device})")
    if dtype not in DTYPES:
        return False, f"2:4 sparse tensor cores take float16/bfloat16 operands, not {str(dtype).removeprefix('torch.')}"
    if getattr(torch.sparse, "to_sparse_semi_structured", None) is None:
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe(index, dtype)


@functools.lru_cache(maxsize=None)
def _probe(index: int, dtype: torch.dtype) -> tuple[bool, str]:
    device = torch.device("cuda", index)
    if not torch.version.hip:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"2:4 sparse tensor cores need compute capability 8.0+, this GPU has {major}.{minor}"
    try:
        gen = torch.Generator(device).manual_seed(0)
        w = torch.randn(128, 128, device=device, generator=gen).to(dtype)
        w = w * torch.tensor([1, 1, 0, 0], device=device, dtype=dtype).repeat(128, 32)
        x = torch.randn(64, 128, device=device, generator=gen).to(dtype)
        y = F.linear(x, torch.sparse.to_sparse_semi_structured(w))
        if not torch.allclose(y.float(), (x.float() @ w.float().t()), rtol=2e-2, atol=1e-1):
            return False, "torch's semi-structured 2:4 matmul gave wrong results on this GPU"
    except Exception as e:           # noqa: BLE001 - any failure means: not usable here, and why
        first = str(e).splitlines()[0][:160] if str(e) else ""
        return False, f"torch's semi-structured 2:4 does not run here: {type(e).__name__}: {first}"
    return True, ""


def dense(values2d: torch.Tensor, col2d: torch.Tensor, n_in: int) -> torch.Tensor:
    """The dense [n_out, n_in] weight of an N:M weight in ELL layout (values2d, col2d [n_out, K])."""
    return values2d.new_zeros(values2d.shape[0], n_in).scatter_(1, col2d.long(), values2d)


def mm(x: torch.Tensor, values2d: torch.Tensor, col2d: torch.Tensor, n_in: int) -> torch.Tensor:
    """y = x @ W^T on sparse tensor cores."""
    return F.linear(x, torch.sparse.to_sparse_semi_structured(dense(values2d, col2d, n_in)))


def mm_t(g: torch.Tensor, values2d: torch.Tensor, col2d: torch.Tensor, n_in: int) -> torch.Tensor:
    """gx = g @ W on sparse tensor cores: W^T must be 2:4 (a transposable pattern)."""
    wt = dense(values2d, col2d, n_in).t().contiguous()
    return F.linear(g, torch.sparse.to_sparse_semi_structured(wt))
