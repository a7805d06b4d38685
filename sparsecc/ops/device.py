"""Which implementation runs a sparsecc:: op: Triton kernels (sparsecc.codegen.triton) for GPU tensors, or for
CPU tensors when SPARSECC_TRITON=1 (with TRITON_INTERPRET=1: Triton's interpreter, how CI checks them);
otherwise the CPU kernels (C++/OpenMP, or PyTorch fallbacks)."""
from __future__ import annotations

import os

import torch


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # what the generated kernels take
CPU_DTYPES = (torch.float32, torch.float64)                      # what the CPU kernels take


def use_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or os.environ.get("SPARSECC_TRITON") == "1"


def triton_kernels():
    """The generated-kernel launchers; a clear error when triton is not installed."""
    try:
        from ..codegen import triton as kernels
    except ImportError as e:
        raise RuntimeError(f"sparsecc needs the 'triton' package for GPU tensors (or SPARSECC_TRITON=1): {e}; "
                           f"pip install -c constraints.txt triton") from e
    return kernels


def kernel_dtypes(t: torch.Tensor) -> tuple[torch.dtype, ...]:
    """The dtypes the sparse kernels that would run for tensors like t (a fake value at compile time) take."""
    return TRITON_DTYPES if use_triton(t) else CPU_DTYPES
