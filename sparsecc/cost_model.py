"""Does the sparse kernel beat the dense one for this op? Decided by measuring both on the device that will run it.

For one linear (tokens x in -> out, a dtype, a sparse format and density) the model times forward +
input gradient + weight gradient of the sparse ops against the dense GEMMs, on random data with the same
sparsity structure, and keeps the answer in a JSON cache (one file per device setup, under $SPARSECC_CACHE_DIR
or ~/.cache/sparsecc) so each shape is measured once.

Per device: the measurement runs on the device and dtype of the compiled parameters (LinearShape.device, or the
compilation in progress: compiling(), which the backend sets from the parameters), with the kernels that will run
there: the generated Triton kernels for CUDA parameters or SPARSECC_TRITON=1 (the sparsecc:: ops dispatch to them),
the C++/CPU kernels otherwise (unchanged). The cache file is keyed by the device (its name and compute capability on
a GPU; the CPU architecture, thread count and whether the C++ kernels are built on the CPU) and the torch and
triton versions; the dtype is part of each entry's key. So no GPU rewrite is ever decided from CPU timings. On a
GPU every shape is measured with CUDA events, a few warm-up and timed launches (well under a second, plus Triton's
one-time compilation and tuning of the kernels), with a progress line per shape.

Refusals that need no measurement, with their reason: a dtype the Triton kernels do not take (float64 on a GPU),
no triton installed. N:M weights on the Triton path are timed on their own kernels (the N:M ELL kernels) and, for
2:4 in float16/bfloat16 on a GPU with sparse tensor cores, on those (torch's semi-structured sparsity: forward,
and the input gradient too for NM(2, 4, transposable=True)); the faster is recorded (nm_choice) and the N:M ops use
it (ops/tuning.py, which holds the timers and the cache files too); where sparse tensor cores cannot run, the
reason is part of the decision's text. On a GPU the weight gradient of every sparse format runs the generated
SDDMM kernel or the dense GEMM with the kept entries gathered from it, whichever measured faster for the shape
(ops/tuning.py's sddmm_choice, measured within the sparse timing here); the Channels weight gradient chooses
between the generated kernel and the gathered slice + cuBLAS the same way (channels_choice).
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, replace

import torch

from .ops import semi_structured, tuning
from .ops.device import TRITON_DTYPES, triton_kernels
from .ops.tuning import DeviceInfo, device_info
from .progress import say
from .sparse_weights import SparseWeight
from .sparsity import NM, Blocks, Unstructured

MIN_SPEEDUP = 1.05    # a rewrite must win by more than this machine's run-to-run noise


@dataclass(frozen=True)
class LinearShape:
    tokens: int
    out: int
    inp: int
    dtype: torch.dtype
    fmt: str           # "blocks" | "csr"
    block: int         # block size (1 for csr)
    density: float     # fraction of entries stored
    device: str | None = None    # where the parameters live ("cpu", "cuda", "cuda:1"); None: the device of the
                                 # compilation in progress (compiling()), else the CPU
    pattern: str | None = None   # an N:M weight in "csr" format: "2:4", or "2:4T" for a transposable one; None: taken
                                 # from the compilation in progress on the Triton path (the CPU runs N:M as CSR)

    def key(self) -> str:
        fmt = f"nm{self.pattern}" if self.pattern else f"{self.fmt}{self.block if self.fmt == 'blocks' else ''}"
        dtype = str(self.dtype).removeprefix('torch.')
        return f"{self.tokens}x{self.inp}->{self.out} {dtype} {fmt} d={self.density:.4f}"

    @property
    def dense_flops(self) -> int:
        """forward + input gradient + weight gradient, 2 FLOPs per multiply-add."""
        return 3 * 2 * self.tokens * self.out * self.inp


@dataclass(frozen=True)
class Decision:
    rewrite: bool
    reason: str
    speedup: float | None = None     # measured dense time / sparse time


# ---- the compilation in progress: its parameters' device and N:M patterns (set by the backend) -------------------

_COMPILING: contextvars.ContextVar[tuple[str | None, dict] | None] = contextvars.ContextVar("sparsecc_compiling",
                                                                                          default=None)


@contextlib.contextmanager
def compiling(device: str | torch.device | None, nm_patterns: dict | None = None):
    """Within: LinearShapes without a device are measured on `device` (the compiled parameters'), and an N:M
    weight's pattern is looked up by its (out, in) shape in nm_patterns ({(out, in): sparsecc.NM})."""
    token = _COMPILING.set((None if device is None else str(device), dict(nm_patterns or {})))
    try:
        yield
    finally:
        _COMPILING.reset(token)


def nm_patterns(patterns: dict, params: dict) -> dict:
    """{(out, in): NM} of a model's N:M weights (name -> pattern, name -> parameter); a shape two different N:M
    patterns share keeps the non-transposable one (the conservative choice)."""
    out = {}
    for name, pattern in patterns.items():
        if isinstance(pattern, NM) and name in params:
            shape = (params[name].shape[0], params[name][0].numel())
            if shape in out and out[shape] != pattern:
                pattern = NM(pattern.n, pattern.m)
            out[shape] = pattern
    return out


def resolve(shape: LinearShape) -> LinearShape:
    """The shape with its device and (on the Triton path) its N:M pattern filled in from the compilation."""
    context = _COMPILING.get()
    device = shape.device or (context[0] if context else None) or "cpu"
    shape = replace(shape, device=device)
    if shape.pattern is None and shape.fmt == "csr" and context and device_info(device).triton:
        nm = context[1].get((shape.out, shape.inp))
        if nm is not None and abs(nm.density - shape.density) < 1e-9:
            shape = replace(shape, pattern=f"{nm.n}:{nm.m}{'T' if nm.transposable else ''}")
    return shape


def _nm_of(pattern: str):
    n, m = pattern.rstrip("T").split(":")
    return NM(int(n), int(m), transposable=pattern.endswith("T"))


def _support(shape: LinearShape, device: torch.device, gen: torch.Generator):
    """(pattern, random support) with the shape's sparsity structure, on the device. The CPU keeps the supports it
    always drew (the patterns' magnitude masks of noise); on a GPU they are drawn there directly (exact block count)."""
    if shape.pattern:
        pattern = _nm_of(shape.pattern)
        return pattern, pattern.mask(torch.randn(shape.out, shape.inp, generator=gen, device=device))
    pattern = Blocks(shape.block, shape.density) if shape.fmt == "blocks" else Unstructured(shape.density)
    if device.type == "cpu":
        return pattern, pattern.mask(torch.randn(shape.out, shape.inp, generator=gen))    # random: norms of noise
    if shape.fmt == "blocks":
        b = shape.block
        grid = torch.zeros(shape.out // b * (shape.inp // b), dtype=torch.bool, device=device)
        k = max(1, round(shape.density * grid.numel()))
        grid[torch.randperm(grid.numel(), generator=gen, device=device)[:k]] = True
        grid = grid.view(shape.out // b, shape.inp // b)
        return pattern, grid.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return pattern, torch.rand(shape.out, shape.inp, generator=gen, device=device) < shape.density


def _sparse_steps(shape: LinearShape, sw, values, x, g, impl: str = "ell"):
    """forward + input gradient + weight gradient of the sparse kernels that run for the shape on its device:
    the sparsecc:: ops (which dispatch to the Triton launchers on the Triton path), or for an N:M weight on the
    Triton path its N:M kernels (`impl` "ell") or sparse tensor cores ("semi": forward; "semiT": forward and input
    gradient, a transposable 2:4 weight)."""
    if not shape.pattern:
        return sw.format.steps(sw.index, values, x, g, shape.out, shape.inp, shape.block)
    i = sw.index
    T, m = triton_kernels(), _nm_of(shape.pattern).m
    values2d, col2d = values.view(shape.out, -1), i["col"].view(shape.out, -1)
    fwd = (lambda: semi_structured.mm(x, values2d, col2d, shape.inp)) if impl.startswith("semi") else \
        (lambda: T.nm_mm(x, values2d, col2d, shape.out, m=m))
    bwd = (lambda: semi_structured.mm_t(g, values2d, col2d, shape.inp)) if impl == "semiT" else \
        (lambda: T.nm_mm_t(g, values2d, col2d, shape.inp, m=m))

    def sparse():                   # the weight gradient as the op runs it: SDDMM kernel or GEMM + gather
        fwd(), bwd(), torch.ops.sparsecc.nm_sddmm(g, x, i["crow"], i["col"], m)
    return sparse


def measure(shape: LinearShape) -> tuple:
    """(dense ms, sparse ms) for forward + both gradients on the shape's device (resolve() fills it in), interleaved
    so drift hits both alike; for an N:M weight on a GPU also the implementation that was faster ("ell", "semi",
    "semiT")."""
    shape = shape if shape.device else resolve(shape)
    info = device_info(shape.device)
    device = torch.device(info.device)
    gen = torch.Generator(device).manual_seed(0)
    pattern, support = _support(shape, device, gen)
    sw = SparseWeight.create("cost_model", pattern, support, shape.dtype)
    w = torch.randn(shape.out, shape.inp, generator=gen, device=device).to(shape.dtype) * support
    x = torch.randn(shape.tokens, shape.inp, generator=gen, device=device).to(shape.dtype)
    g = torch.randn(shape.tokens, shape.out, generator=gen, device=device).to(shape.dtype)
    values = sw.gather(w)

    def dense():
        x @ w.t(), g @ w, g.t() @ x

    impls = ["ell"]
    if info.is_gpu and shape.pattern and shape.pattern.startswith("2:4"):
        if semi_structured.available(device, shape.dtype)[0]:
            impls.append("semiT" if shape.pattern.endswith("T") else "semi")
    steps = {impl: _sparse_steps(shape, sw, values, x, g, impl) for impl in impls}
    timer = (lambda fn: tuning.gpu_median_ms(fn, device)) if info.is_gpu else tuning.median_ms
    dense_ms, sparse_ms = [], {impl: [] for impl in impls}
    for _ in range(2):
        dense_ms.append(timer(dense))
        for impl, fn in steps.items():
            try:
                sparse_ms[impl].append(timer(fn))
            except Exception:          # noqa: BLE001 - sparse tensor cores that fail at this shape: not chosen
                if impl == "ell":
                    raise
                sparse_ms[impl].append(float("inf"))
    best = min(impls, key=lambda impl: min(sparse_ms[impl]))
    if info.is_gpu and shape.pattern:
        return min(dense_ms), min(sparse_ms[best]), best
    return min(dense_ms), min(sparse_ms[best])


def unsupported(shape: LinearShape, info: DeviceInfo) -> str | None:
    """Why the sparse kernels cannot run for the shape on the device at all (no measurement needed), or None."""
    where = f"on {info.name}" if info.is_gpu else "on the Triton path (SPARSECC_TRITON=1)"
    if info.triton and tuning.triton_version() is None:
        return f"kept dense: the sparse kernels {where} are generated Triton kernels and triton is not installed"
    if info.triton and shape.dtype not in TRITON_DTYPES:
        return (f"kept dense: the generated Triton kernels {where} take float32/float16/bfloat16, not "
                f"{str(shape.dtype).removeprefix('torch.')}, so the dense GEMM runs on the masked weight")
    return None


_IMPLS = {"ell": "generated N:M kernels", "semi": "2:4 sparse tensor cores forward, generated N:M kernels backward",
          "semiT": "2:4 sparse tensor cores forward and input gradient"}



def _verdict(dense_ms: float, sparse_ms: float, impl: str | None = None, shape: LinearShape | None = None,
             info: DeviceInfo | None = None) -> Decision:
    speedup = dense_ms / sparse_ms if sparse_ms > 0 else float("inf")
    verdict = f"measured fwd+bwd sparse {sparse_ms:.2f} ms vs dense {dense_ms:.2f} ms ({speedup:.2f}x)"
    if info is not None and info.is_gpu:
        verdict += f" on {info.name}" + (f", {_IMPLS[impl]}" if impl in _IMPLS else ", generated Triton kernels")
        if shape is not None and shape.pattern and shape.pattern.startswith("2:4") and impl == "ell":
            usable, why = semi_structured.available(info.device, shape.dtype)
            verdict += f" ({why})" if not usable else " (sparse tensor cores were slower)"
    if speedup > MIN_SPEEDUP:
        if info is not None and shape is not None and shape.pattern and info.is_gpu:
            nm = _nm_of(shape.pattern)
            tuning.record_nm_choice(info.device, shape.dtype, shape.out, shape.inp, nm.n, nm.m, impl)
        return Decision(True, verdict, speedup)
    return Decision(False, f"{verdict}: not faster by {MIN_SPEEDUP}x here, so the dense GEMM runs on the masked "
                           f"weight", speedup)


def decide_all(shapes: list[LinearShape]) -> list[Decision]:
    """decide() for several calls: the shapes not cached yet are measured first, on their device, one progress
    line each ("measuring sparse vs dense 3/8: ..."), so a long first compilation says how much is left."""
    resolved = [resolve(s) for s in shapes]
    decisions: list[Decision | None] = [None] * len(shapes)
    groups: dict[str, list[int]] = {}
    for i, shape in enumerate(resolved):
        groups.setdefault(device_info(shape.device).setup, []).append(i)
    for positions in groups.values():
        device = resolved[positions[0]].device
        info = device_info(device)
        path = tuning.cache_file(info)
        cache = tuning.load(path)
        for i in positions:
            why = unsupported(resolved[i], info)
            if why:
                decisions[i] = Decision(False, why)
        missing = list(dict.fromkeys(resolved[i].key() for i in positions
                                     if decisions[i] is None and resolved[i].key() not in cache))
        by_key = {resolved[i].key(): resolved[i] for i in positions}
        if missing:
            where = f"on {info.name} ({info.device})" if info.is_gpu else "on this machine"
            say(f"measuring sparse vs dense kernels for {len(missing)} shape(s) {where}, once: the answers are "
                f"cached in {path}")
        start = time.perf_counter()
        for i, key in enumerate(missing, 1):
            say(f"measuring sparse vs dense {i}/{len(missing)}: {key} ...")
            cache[key] = list(measure(by_key[key]))
            tuning.store(path, key, cache[key])
        if missing:
            say(f"measured {len(missing)} shape(s) in {time.perf_counter() - start:.1f} s")
        for i in positions:
            if decisions[i] is None:
                decisions[i] = _verdict(*cache[resolved[i].key()][:3], shape=resolved[i], info=info)
    return decisions


def decide(shape: LinearShape) -> Decision:
    """Rewrite when the measured sparse time beats dense by MIN_SPEEDUP; answers are cached per shape."""
    return decide_all([shape])[0]
