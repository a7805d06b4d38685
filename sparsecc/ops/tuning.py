"""Measuring on the device that runs a kernel, and the choices the kernels make from those measurements.

The cost model (cost_model.py) and the kernels' own runtime choices share this: DeviceInfo (what a measurement
depends on: the GPU's name and compute capability, or the CPU setup; torch and triton versions), CPU and CUDA-event
timers, and one JSON file of measurements per device setup under the cache directory. nm_choice tells the N:M ops
whether the cost model found 2:4 sparse tensor cores faster for a weight; fastest() times the ways an op can run on a
GPU once per shape (channels_choice: the Channels weight gradient's generated kernel against slice + cuBLAS;
sddmm_choice: a sparse weight gradient's SDDMM kernel against cuBLAS's dense GEMM + gather). Ops import this module;
it imports no compiler module, so the kernels never reach back into the cost model.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import cache_dir
from . import native


@dataclass(frozen=True)
class DeviceInfo:
    """A device as the cost model and the kernels' own choices see it."""

    device: str                          # "cpu" or "cuda:<index>"
    name: str                            # "cpu", or the GPU's name
    capability: tuple[int, int] | None   # a CUDA GPU's compute capability (None on the CPU and ROCm)
    triton: bool                         # the sparsecc:: ops run the generated Triton kernels here
    setup: str                           # what the measurements depend on: the cache file's tag

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")


def triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def device_info(device: str | torch.device | None = None) -> DeviceInfo:
    """The DeviceInfo of a device (default: the CPU)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _gpu_info(index, torch.__version__, triton_version())
    triton = os.environ.get("SPARSECC_TRITON") == "1"
    setup = f"{platform.machine()}-torch{torch.__version__}-t{torch.get_num_threads()}-native{int(native.available())}"
    if triton:
        setup += f"-triton{triton_version()}-interpret{int(os.environ.get('TRITON_INTERPRET') == '1')}"
    return DeviceInfo("cpu", "cpu", None, triton, setup)


@functools.lru_cache(maxsize=None)
def _gpu_info(index: int, torch_version: str, triton_version: str | None) -> DeviceInfo:
    name = torch.cuda.get_device_name(index)
    capability = None if torch.version.hip else tuple(torch.cuda.get_device_capability(index))
    arch = f"cc{capability[0]}{capability[1]}" if capability else "rocm"
    setup = f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{arch}-torch{torch_version}-triton{triton_version}"
    return DeviceInfo(f"cuda:{index}", name, capability, True, setup)


def cache_file(info: DeviceInfo) -> Path:
    """The JSON file holding the measurements made on this device setup."""
    return cache_dir() / f"cost_model-{info.setup}.json"


def median_ms(fn, reps: int = 3) -> float:
    """Median ms of fn on the CPU: one warm-up call, then reps timed ones."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gpu_median_ms(fn, device: torch.device, budget_ms: float = 60.0) -> float:
    """Median ms of fn on a GPU with CUDA events: one warm-up call (compiles and tunes kernels the first time),
    one probe, then as many timed calls as fit in budget_ms (3 to 25)."""
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    reps = int(min(25, max(3, budget_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(b) for a, b in events)


def load(path: Path) -> dict:
    """A measurement file's entries ({} when it is missing or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def store(path: Path, key: str, value: list) -> None:
    """Add one entry to a measurement file, atomically (written beside it, then renamed)."""
    cache = load(path)        # re-read: another process may have added shapes meanwhile
    cache[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(path)


_NM_CHOICE: dict[tuple, str] = {}      # (device, dtype, out, in, n, m) -> "semi" | "semiT": see nm_choice


def nm_choice(device: torch.device, dtype: torch.dtype, out: int, inp: int, n: int, m: int) -> str | None:
    """How the N:M ops run a rewritten N:M weight of this shape on this GPU, as the cost model decided (record_nm_choice): "semi"
    (sparse tensor cores forward), "semiT" (forward and input gradient), or None (the generated N:M kernels)."""
    if device.type != "cuda":
        return None
    return _NM_CHOICE.get((device_info(device).device, dtype, out, inp, n, m))


def record_nm_choice(device: str, dtype: torch.dtype, out: int, inp: int, n: int, m: int, impl: str | None) -> None:
    """What the cost model measured fastest for an N:M weight on a GPU ("semi", "semiT", or None: ELL kernels)."""
    key = (device, dtype, out, inp, n, m)
    if impl in ("semi", "semiT"):
        _NM_CHOICE[key] = impl
    else:
        _NM_CHOICE.pop(key, None)


def fastest(device: torch.device, key: str, options: dict) -> str:
    """The name of the fastest of `options` (name -> a callable computing the same result another way) on a GPU:
    each timed with CUDA events at the first call of `key`, then remembered in memory and in the device's
    measurement file (the cost model's), so it is measured once per device setup. Off a GPU (the interpreter,
    SPARSECC_TRITON=1 on the CPU) the first option, unmeasured."""
    if device.type != "cuda":
        return next(iter(options))
    info = device_info(device)
    memo = _FASTEST.get((info.setup, key))
    if memo is None:
        path = cache_file(info)
        entry = load(path).get(key)
        if not isinstance(entry, dict) or set(entry) != set(options):
            entry = {name: gpu_median_ms(fn, torch.device(info.device), 20.0) for name, fn in options.items()}
            store(path, key, entry)
        memo = _FASTEST[(info.setup, key)] = min(entry, key=entry.get)
    return memo


def fastest_known(device: torch.device, key: str) -> str | None:
    """What fastest() chose or would choose for `key` on this device setup without measuring: from memory or the
    measurement file; None when it was never measured (or off a GPU)."""
    if device.type != "cuda":
        return None
    info = device_info(device)
    if (info.setup, key) not in _FASTEST:          # read once: the memory model asks for every such op it meets
        entry = load(cache_file(info)).get(key)
        if not isinstance(entry, dict) or not entry:
            return None
        _FASTEST[(info.setup, key)] = min(entry, key=entry.get)
    return _FASTEST[(info.setup, key)]


_FASTEST: dict[tuple[str, str], str] = {}


def channels_choice(g: torch.Tensor, x: torch.Tensor, idx_or_k, dim: str, kernel, sliced) -> str:
    """"kernel" or "slice+mm": how the Channels weight gradient runs for this call. On a GPU, whichever of the
    generated kernel (`kernel()`) and the gathered slice + cuBLAS (`sliced()`) measured faster for the shape (first
    call of each shape and dtype, see fastest()), so it is never slower than the slice + cuBLAS; elsewhere (the
    interpreter, SPARSECC_TRITON=1 on the CPU) the kernel."""
    indexed = isinstance(idx_or_k, torch.Tensor)
    k = idx_or_k.shape[0] if indexed else int(idx_or_k)
    key = (f"channels {g.shape[0]}x{g.shape[1]}x{x.shape[1]} k={k} dim={dim} {'index' if indexed else 'first'} "
           f"{str(x.dtype).removeprefix('torch.')}")
    return fastest(x.device, key, {"kernel": kernel, "slice+mm": sliced})


def sddmm_key(op: str, g, x, *index) -> str:
    """fastest()'s key for a sparse weight gradient g^T @ x kept at the entries of a sparse weight: the op's name
    ("block_sddmm", "nm_sddmm", "csr_sddmm") and its arguments (g, x, then the index arguments: (rows, cols, b),
    (crow, col, m), (crow, col))."""
    if op == "block_sddmm":
        rows, _, b = index
        nnz, pattern = rows.shape[0], f"b{b}"
    elif op == "nm_sddmm":
        _, col, m = index
        nnz = col.shape[0]
        pattern = f"{nnz // max(g.shape[1], 1) * m // max(x.shape[1], 1)}:{m}"
    else:
        nnz, pattern = index[1].shape[0], "csr"
    return f"{op} {g.shape[0]}x{g.shape[1]}x{x.shape[1]} {pattern} nnz={nnz} {str(x.dtype).removeprefix('torch.')}"


def sddmm_choice(op: str, args: tuple, kernel, gemm) -> str:
    """"kernel" or "gemm": how a sparse weight gradient (op, args: see sddmm_key) runs on a GPU, whichever of the
    generated SDDMM kernel (`kernel()`) and the dense GEMM g^T @ x through cuBLAS with the kept entries gathered
    from it (`gemm()`: it holds a dense [out, in] gradient while it runs) measured faster for the shape (see
    fastest()); so the weight gradient is never slower than the dense one's GEMM. Off a GPU, the kernel."""
    return fastest(args[1].device, sddmm_key(op, *args), {"kernel": kernel, "gemm": gemm})
