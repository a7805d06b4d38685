"""Hand-written C++/OpenMP CPU kernels for sparse weights (kernels.cpp), compiled once and called through ctypes.

The library is built on first use with `g++ -O3 -march=native -fopenmp -shared -fPIC` (or $CXX) into
$SPARSECC_CACHE_DIR (default ~/.cache/sparsecc) as kernels-<hash>.so, the hash covering the source, the command, the
compiler's version and the host CPU; it is written to a temporary file and renamed, so concurrent processes are
safe. Nothing raises at import: if the build fails, available() is False and why_unavailable() says why.

All tensors must be on the CPU; dense operands and values float32 or float64 (one dtype per call), indices int64.
Inputs are made contiguous (a copy if they are not), except block_spmm's values, which may be any strided view.
    block_spmm(x, values, dst, src, n_dst)   y [N, n_dst]: y[:, dst[k]*b:+b] += x[:, src[k]*b:+b] @ values[k]^T
                                             forward of x @ W^T: (x, values, rows, cols, n_out);
                                             input gradient g @ W: (g, values.transpose(1, 2), cols, rows, n_in)
    block_sddmm(g, x, rows, cols, b)         out [nnzb, b, b]: out[k] = g[:, rows[k]*b:+b]^T @ x[:, cols[k]*b:+b]
    csr_spmm(x, crow, col, values, n_out)    y = x @ W^T, W [n_out, n_in] in CSR; the input gradient g @ W is
                                             csr_spmm(g, ...) on the CSR of W^T (its values are W's values permuted)
    csr_sddmm(g, x, crow, col)               vals [nnz]: vals[k] = sum_t g[t, row(k)] * x[t, col[k]]
    swiglu_backward(out, g, gate, which)     in place, float32/float64/bfloat16, contiguous: "gate": out (up) <-
                                             g * up * silu'(gate); "up": out (g itself) <- g * silu(gate)
The kernels use torch.get_num_threads() threads; OpenMP is shared with torch (both load libgomp.so.1).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .. import progress
from ..cache import cache_dir

_SOURCE = Path(__file__).with_name("kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # argument types of each exported function (pointers, then sizes), per dtype suffix
    "block_spmm": [_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _P, _I64, _INT],
    "block_sddmm": [_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _P, _INT],
    "csr_spmm": [_P, _I64, _I64, _P, _P, _I64, _P, _P, _I64, _INT],
    "csr_sddmm": [_P, _P, _I64, _I64, _I64, _P, _P, _I64, _P, _INT],
}
_POINTWISE = {"swiglu_backward": [_P, _P, _P, _I64, _INT, _INT]}   # also for bfloat16
_POINTWISE_SUFFIX = {**_SUFFIX, torch.bfloat16: "bf16"}
POINTWISE_DTYPES = tuple(_POINTWISE_SUFFIX)


def _host() -> str:
    """The CPU the binary is built for: -march=native code from another machine sharing the cache could crash."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}"


def _build() -> Path:
    """The path of the compiled library, building it if the cache has none for this source, compiler and CPU."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError(f"no C++ compiler: {os.environ.get('CXX', 'g++')!r} is not on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([cxx, *_FLAGS]).encode(), version.encode(), _host().encode()]))
    cache = cache_dir()
    lib = cache / f"kernels-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".kernels-", suffix=".so")
    os.close(fd)
    try:
        with progress.waiting(f"compiling sparsecc's C++ kernels with {Path(cxx).name} (once per machine, into {cache})"):
            done = subprocess.run([cxx, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {_SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: another process sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, str(e)
    for table, suffixes in ((_SIGNATURES, _SUFFIX), (_POINTWISE, _POINTWISE_SUFFIX)):
        for name, argtypes in table.items():
            for sfx in suffixes.values():
                fn = getattr(lib, f"sparsecc_{name}_{sfx}")
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib, None


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _load()[0] is not None


def usable(t: torch.Tensor, dtypes=tuple(_SUFFIX)) -> bool:
    """Whether the kernels can take this operand: a CPU tensor of one of dtypes (the sparse kernels': float32,
    float64; POINTWISE_DTYPES for swiglu_backward), kernels built, not disabled (SPARSECC_NATIVE=0 makes the ops use
    their PyTorch fallbacks)."""
    return t.device.type == "cpu" and t.dtype in dtypes and os.environ.get("SPARSECC_NATIVE") != "0" \
        and available()


def why_unavailable() -> str | None:
    """Why the kernels are not available (the compiler's error), or None if they are."""
    return _load()[1]


def _kernel(name: str, dtype: torch.dtype):
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"sparsecc native kernels unavailable: {why}")
    if dtype not in _SUFFIX:
        raise TypeError(f"sparsecc native {name}: float32 or float64 only, got {dtype}")
    return getattr(lib, f"sparsecc_{name}_{_SUFFIX[dtype]}")


def _dense(name: str, dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype:
            raise TypeError(f"sparsecc native {name}: expected CPU {dtype} tensors, got {t.device} {t.dtype}")
    return [t.contiguous() for t in tensors]


def _index(name: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.int64:
            raise TypeError(f"sparsecc native {name}: expected CPU int64 indices, got {t.device} {t.dtype}")
    return [t.contiguous() for t in tensors]


def _shape(name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"sparsecc native {name}: {what}")


def _call(name: str, fn, *args) -> None:
    args = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    if fn(*args, torch.get_num_threads()) != 0:
        raise IndexError(f"sparsecc native {name}: an index is out of range (or crow is not a valid CSR row pointer)")


def block_spmm(x: torch.Tensor, values: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, n_dst: int) -> torch.Tensor:
    """y [N, n_dst], zero but for y[:, dst[k]*b:+b] += x[:, src[k]*b:+b] @ values[k]^T; values [nnzb, b, b], any strides."""
    fn = _kernel("block_spmm", x.dtype)
    (x,), (dst, src) = _dense("block_spmm", x.dtype, x), _index("block_spmm", dst, src)
    if values.dtype != x.dtype or values.device.type != "cpu":
        raise TypeError(f"sparsecc native block_spmm: values must be CPU {x.dtype}, got {values.device} {values.dtype}")
    b = values.shape[-1]
    _shape("block_spmm", x.dim() == 2 and values.dim() == 3 and values.shape[1] == b > 0
           and dst.shape == src.shape == values.shape[:1], "x [N, n_src], values [nnzb, b, b], dst and src [nnzb]")
    # the kernel writes every full block-column of y; only a ragged last one needs zeros up front
    y = x.new_empty(x.shape[0], n_dst) if n_dst % b == 0 else x.new_zeros(x.shape[0], n_dst)
    _call("block_spmm", fn, x, x.shape[0], x.shape[1], values, *values.stride(), dst, src, dst.shape[0], b, y, n_dst)
    return y


def block_sddmm(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """out [nnzb, b, b]: out[k] = g[:, rows[k]*b:+b]^T @ x[:, cols[k]*b:+b] (the weight gradient at the blocks)."""
    fn = _kernel("block_sddmm", g.dtype)
    (g, x), (rows, cols) = _dense("block_sddmm", g.dtype, g, x), _index("block_sddmm", rows, cols)
    _shape("block_sddmm", g.dim() == x.dim() == 2 and g.shape[0] == x.shape[0] and rows.shape == cols.shape
           and rows.dim() == 1 and b > 0, "g [N, n_out], x [N, n_in], rows and cols [nnzb], b > 0")
    out = g.new_empty(rows.shape[0], b, b)
    _call("block_sddmm", fn, g, x, g.shape[0], g.shape[1], x.shape[1], rows, cols, rows.shape[0], b, out)
    return out


def csr_spmm(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_out: int) -> torch.Tensor:
    """y [N, n_out] = x @ W^T for W [n_out, x.shape[1]] in CSR (crow [n_out + 1], col [nnz], values [nnz])."""
    fn = _kernel("csr_spmm", x.dtype)
    (x, values), (crow, col) = _dense("csr_spmm", x.dtype, x, values), _index("csr_spmm", crow, col)
    _shape("csr_spmm", x.dim() == 2 and crow.shape == (n_out + 1,) and col.dim() == 1 and values.shape == col.shape,
           "x [N, n_in], crow [n_out + 1], col and values [nnz]")
    y = x.new_empty(x.shape[0], n_out)
    _call("csr_spmm", fn, x, x.shape[0], x.shape[1], crow, col, col.shape[0], values, y, n_out)
    return y


def csr_sddmm(g: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """vals [nnz]: vals[k] = sum_t g[t, row(k)] * x[t, col[k]] (the gradient of W in y = x @ W^T at its nonzeros)."""
    fn = _kernel("csr_sddmm", g.dtype)
    (g, x), (crow, col) = _dense("csr_sddmm", g.dtype, g, x), _index("csr_sddmm", crow, col)
    _shape("csr_sddmm", g.dim() == x.dim() == 2 and g.shape[0] == x.shape[0] and crow.shape == (g.shape[1] + 1,)
           and col.dim() == 1, "g [N, n_out], x [N, n_in], crow [n_out + 1], col [nnz]")
    vals = g.new_zeros(col.shape[0])
    _call("csr_sddmm", fn, g, x, g.shape[0], g.shape[1], x.shape[1], crow, col, col.shape[0], vals)
    return vals


def swiglu_backward(out: torch.Tensor, g: torch.Tensor, gate: torch.Tensor, which: str) -> None:
    """In place (ops/swiglu.py): which="gate": out (up) <- g * up * silu'(gate); "up": out (g; pass it as g too) <-
    g * silu(gate). CPU float32/float64/bfloat16 tensors of one shape, contiguous."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"sparsecc native kernels unavailable: {why}")
    if out.dtype not in _POINTWISE_SUFFIX:
        raise TypeError(f"sparsecc native swiglu_backward: float32, float64 or bfloat16, got {out.dtype}")
    for t in (out, g, gate):
        if t.device.type != "cpu" or t.dtype != out.dtype or t.shape != out.shape or not t.is_contiguous():
            raise TypeError(f"sparsecc native swiglu_backward: contiguous CPU {out.dtype} tensors of shape "
                            f"{tuple(out.shape)}, got {t.device} {t.dtype} {tuple(t.shape)}")
    if which not in ("gate", "up"):
        raise ValueError(f"which must be 'gate' or 'up', got {which!r}")
    fn = getattr(lib, f"sparsecc_swiglu_backward_{_POINTWISE_SUFFIX[out.dtype]}")
    _call("swiglu_backward", fn, out, g, gate, out.numel(), 0 if which == "gate" else 1)
