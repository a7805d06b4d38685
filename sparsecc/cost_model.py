"""Does the sparse kernel beat the dense one for this op? Decided by measuring both on this machine.

For one linear (tokens x in -> out, a dtype, a sparse format and density) the model times forward +
input gradient + weight gradient of the sparse ops against the dense GEMMs (torch/MKL), on random data
with the same sparsity structure, and keeps the answer in a JSON cache (one file per machine setup,
under $SPARSECC_CACHE_DIR or ~/.cache/sparsecc) so each shape is measured once.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .ops import native

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

    def key(self) -> str:
        return (f"{self.tokens}x{self.inp}->{self.out} {str(self.dtype).removeprefix('torch.')} "
                f"{self.fmt}{self.block if self.fmt == 'blocks' else ''} d={self.density:.4f}")

    @property
    def dense_flops(self) -> int:
        """forward + input gradient + weight gradient, 2 FLOPs per multiply-add."""
        return 3 * 2 * self.tokens * self.out * self.inp


@dataclass(frozen=True)
class Decision:
    rewrite: bool
    reason: str
    speedup: float | None = None     # measured dense time / sparse time


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSECC_CACHE_DIR", Path.home() / ".cache" / "sparsecc"))


def _cache_file() -> Path:
    setup = f"{platform.machine()}-torch{torch.__version__}-t{torch.get_num_threads()}-native{int(native.available())}"
    return cache_dir() / f"cost_model-{setup}.json"


def _median_ms(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(shape: LinearShape) -> tuple[float, float]:
    """(dense ms, sparse ms) for forward + both gradients, interleaved so drift hits both alike."""
    from .sparse_weights import SparseWeight
    from .sparsity import Blocks, Unstructured

    gen = torch.Generator().manual_seed(0)
    pattern = Blocks(shape.block, shape.density) if shape.fmt == "blocks" else Unstructured(shape.density)
    support = pattern.mask(torch.randn(shape.out, shape.inp, generator=gen))    # random: norms of noise
    sw = SparseWeight.create("cost_model", pattern, support, shape.dtype)
    w = torch.randn(shape.out, shape.inp, generator=gen, dtype=shape.dtype) * support
    x = torch.randn(shape.tokens, shape.inp, generator=gen, dtype=shape.dtype)
    g = torch.randn(shape.tokens, shape.out, generator=gen, dtype=shape.dtype)
    values = sw.gather(w)
    sparse_ops = torch.ops.sparsecc

    def dense():
        x @ w.t(), g @ w, g.t() @ x

    if shape.fmt == "blocks":
        rows, cols = sw.index["rows"], sw.index["cols"]

        def sparse():
            sparse_ops.block_sparse_mm(x, values, rows, cols, shape.out)
            sparse_ops.block_sparse_mm_t(g, values, rows, cols, shape.inp)
            sparse_ops.block_sddmm(g, x, rows, cols, shape.block)
    else:
        i = sw.index

        def sparse():
            sparse_ops.csr_mm(x, values, i["crow"], i["col"], i["t_crow"], i["t_col"], i["t_perm"], shape.out)
            sparse_ops.csr_mm_t(g, values, i["t_crow"], i["t_col"], i["t_perm"], shape.inp)
            sparse_ops.csr_sddmm(g, x, i["crow"], i["col"])

    dense_ms, sparse_ms = [], []
    for _ in range(2):
        dense_ms.append(_median_ms(dense))
        sparse_ms.append(_median_ms(sparse))
    return min(dense_ms), min(sparse_ms)


def decide(shape: LinearShape) -> Decision:
    """Rewrite when the measured sparse time beats dense by MIN_SPEEDUP; answers are cached per shape."""
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = shape.key()
    if key not in cache:
        print(f"sparsecc: measuring sparse vs dense kernels for {key} ...", file=sys.stderr, flush=True)
        cache[key] = list(measure(shape))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    dense_ms, sparse_ms = cache[key]
    speedup = dense_ms / sparse_ms if sparse_ms > 0 else float("inf")
    verdict = f"measured fwd+bwd sparse {sparse_ms:.2f} ms vs dense {dense_ms:.2f} ms ({speedup:.2f}x)"
    if speedup > MIN_SPEEDUP:
        return Decision(True, verdict, speedup)
    return Decision(False, f"{verdict}: not faster by {MIN_SPEEDUP}x, kept dense (masked)", speedup)
