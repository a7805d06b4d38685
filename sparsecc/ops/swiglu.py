"""The SwiGLU backward written into its dead inputs, as two in-place sparsecc:: custom ops.

For h = silu(gate) * up with upstream gradient g (all one shape and dtype):
    swiglu_grad_gate_(up, g, gate)   up <- g * up * silu'(gate)      (the gradient of gate)
    swiglu_grad_up_(g, gate)         g  <- g * silu(gate)            (the gradient of up)
with silu'(z) = s(z) * (1 + z * (1 - s(z))), s the logistic sigmoid, computed in float32 (float64 for float64
tensors) and rounded once to the tensors' dtype. Called in this order, each reads every input element before it
writes it, so the two gradients take the storages of up and g instead of two new buffers (the pass
swiglu_backward_in_place emits them where nothing reads up or g afterwards). Declared as mutating their first
argument, so Inductor functionalizes them and re-inplaces them (it copies instead wherever an old value were still
read: never a wrong number).

On the Triton path (CUDA, or SPARSECC_TRITON=1) each is one generated pointwise kernel (one read of each input, one
write). On the CPU it is the C++ kernel (native.py: float32, float64, bfloat16; no temporaries), or where that cannot
run (float16, no compiler, SPARSECC_NATIVE=0) the same float32 math in PyTorch over chunks of CHUNK elements, whose
temporaries memory.kernel_workspace measures (the pass leaves the graph alone where they outweigh what it saves).
"""
from __future__ import annotations

import torch

from . import native
from .device import TRITON_DTYPES, triton_kernels, use_triton

CHUNK = 1 << 16        # elements per CPU step: four float32 temporaries of 256 KiB


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(out: torch.Tensor, *others: torch.Tensor) -> None:
    for t in others:
        if t.shape != out.shape or t.dtype != out.dtype or t.device != out.device:
            raise ValueError(f"the SwiGLU backward's tensors must share shape, dtype and device: got "
                             f"{tuple(out.shape)} {out.dtype} {out.device} and {tuple(t.shape)} {t.dtype} {t.device}")
    if not out.is_contiguous():
        raise ValueError("the SwiGLU backward writes into a contiguous tensor")


def _chunks(*tensors: torch.Tensor):
    flat = [t.reshape(-1) for t in tensors]       # views: out is contiguous; the others are copied if they are not
    for start in range(0, flat[0].numel(), CHUNK):
        yield [f[start:start + CHUNK] for f in flat]


@torch.library.custom_op("sparsecc::swiglu_grad_gate_", mutates_args=("up",))
def swiglu_grad_gate_(up: torch.Tensor, g: torch.Tensor, gate: torch.Tensor) -> None:
    _check(up, g, gate)
    if use_triton(up) and up.dtype in TRITON_DTYPES:
        triton_kernels().swiglu_backward(up, g.contiguous(), gate.contiguous(), "gate")
        return
    if native.usable(up, native.POINTWISE_DTYPES) and g.is_contiguous() and gate.is_contiguous():
        native.swiglu_backward(up, g, gate, "gate")
        return
    dtype = _compute_dtype(up)
    for u, d, z in _chunks(up, g, gate):
        z = z.to(dtype)
        s = torch.sigmoid(z)
        u.copy_(d.to(dtype) * u.to(dtype) * (s * (1 + z * (1 - s))))


@swiglu_grad_gate_.register_fake
def _(up, g, gate):
    return None


@torch.library.custom_op("sparsecc::swiglu_grad_up_", mutates_args=("g",))
def swiglu_grad_up_(g: torch.Tensor, gate: torch.Tensor) -> None:
    _check(g, gate)
    if use_triton(g) and g.dtype in TRITON_DTYPES:
        triton_kernels().swiglu_backward(g, g, gate.contiguous(), "up")
        return
    if native.usable(g, native.POINTWISE_DTYPES) and gate.is_contiguous():
        native.swiglu_backward(g, g, gate, "up")
        return
    dtype = _compute_dtype(g)
    for d, z in _chunks(g, gate):
        d.copy_(d.to(dtype) * torch.nn.functional.silu(z.to(dtype)))


@swiglu_grad_up_.register_fake
def _(g, gate):
    return None


IN_PLACE_OPS = (torch.ops.sparsecc.swiglu_grad_gate_.default, torch.ops.sparsecc.swiglu_grad_up_.default)
