"""Ahead-of-time compilation of generated kernels for real GPU targets, with no GPU present.

triton.compile runs the whole pipeline (ttir -> ttgir -> llir -> ptx -> cubin with the bundled ptxas, or
-> amdgcn -> hsaco with the bundled lld), which rejects what the interpreter lets through (tl.dot edges below
the hardware minimum, unsupported ops or precisions). The shared memory a kernel needs is only checked by the
driver at launch, so aot_compile checks it against the target's limit (configs.SHARED_MEMORY) itself.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .configs import CONFIGS, SHARED_MEMORY
from .generator import Kernel, generate, generated_kernels, imported_for_interpreter
from .templates import Source

GPU_TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_87": GPUTarget("cuda", 87, 32),
               "sm_90": GPUTarget("cuda", 90, 32), "gfx942": GPUTarget("hip", "gfx942", 64)}


class AOTError(RuntimeError):
    """A kernel that compiles but cannot run on the target (it needs more shared memory than the target has)."""


def aot_compile(kernel: str | Kernel, target: str, num_warps: int | None = None, num_stages: int | None = None):
    """Compile a generated kernel (by name, see generated_kernels(), or the Kernel) for "sm_80", "sm_87", "sm_90"
    or "gfx942"; warps and stages default to the tuning table's. Returns Triton's CompiledKernel (its .asm holds
    ptx/cubin or amdgcn/hsaco); raises on any compile error and AOTError on a shared-memory overflow."""
    if imported_for_interpreter():
        raise RuntimeError("triton was imported under TRITON_INTERPRET=1: compile ahead of time in a process "
                           "without it (the interpreter replaces the Triton library functions kernels call)")
    if isinstance(kernel, str):
        kernel = generated_kernels()[kernel]
    cfg = CONFIGS[kernel.source.op][target]
    options = {"num_warps": num_warps or cfg["num_warps"], "num_stages": num_stages or cfg["num_stages"]}
    src = ASTSource(fn=kernel.jit_function(), signature=kernel.source.signature, constexprs={})
    compiled = triton.compile(src, target=GPU_TARGETS[target], options=options)
    if compiled.metadata.shared > SHARED_MEMORY[target]:
        raise AOTError(f"{kernel.name} on {target} needs {compiled.metadata.shared} bytes of shared memory, "
                       f"the target has {SHARED_MEMORY[target]}")
    return compiled


def _compile_or_error(source: Source, target: str) -> str | None:
    try:
        aot_compile(generate(source), target)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[-3000:]}"


def compile_all(jobs: list[tuple[Source, str]], workers: int | None = None) -> dict[tuple[str, str], str | None]:
    """Compile (kernel source, target) pairs in `workers` fresh processes (default: one per CPU); returns the
    error of each (kernel name, target), or None when it compiled and fits the target."""
    jobs = list(dict(((s.name, t), (s, t)) for s, t in jobs).values())
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = pool.map(_compile_or_error, *zip(*jobs)) if jobs else []
        return {(s.name, t): e for (s, t), e in zip(jobs, errors)}
