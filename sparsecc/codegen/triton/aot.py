"""Ahead-of-time compilation of generated kernels for real GPU targets, with no GPU present.

triton.compile runs the whole pipeline (ttir -> ttgir -> llir -> ptx -> cubin with the bundled ptxas, or
-> amdgcn -> hsaco with the bundled lld), which rejects what the interpreter lets through (tl.dot edges below
the hardware minimum, unsupported ops or precisions). The shared memory a kernel needs is only checked by the
driver at launch, so aot_compile checks it against the target's limit (configs.SHARED_MEMORY) itself, and it
rejects a kernel that spills registers to memory (spills_registers): Triton reads spills only when it loads a kernel
on a device, so resources() asks the compiler's own tools: ptxas -v's report of Triton's own ptxas run (or ptxas -v
run again on the PTX when Triton's cache answered) for CUDA, the AMDGPU code object's metadata (.vgpr_spill_count,
ScratchSize) for gfx942.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...cache import cache_dir
from .configs import CONFIGS, SHARED_MEMORY
from .generator import Kernel, generate, generated_kernels, imported_for_interpreter
from .templates import Source

GPU_TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_87": GPUTarget("cuda", 87, 32),
               "sm_90": GPUTarget("cuda", 90, 32), "gfx942": GPUTarget("hip", "gfx942", 64)}


class AOTError(RuntimeError):
    """A kernel that compiles but cannot run on the target (it needs more shared memory than the target has)."""


def _specialised(source: Source, target: str, typical: bool) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compile. `typical`: as Triton's launcher specialises a kernel for
    the calls that matter (operands of a real model): every pointer 16-byte aligned, row strides (s<t>0) multiples
    of 16 elements, column strides (s<t>1) equal to 1 (Triton makes an argument equal to 1 a constant). That is
    the code a GPU runs for them, so its registers, spills and pipelining are the ones checked; else generic."""
    signature, constexprs, attrs = dict(source.signature), {}, {}
    if not typical:
        return signature, constexprs, attrs
    try:
        from triton.compiler.compiler import make_backend
        divisible = make_backend(GPU_TARGETS[target]).parse_attr("D")
    except Exception:                 # noqa: BLE001 - the attribute as Triton 3.x spells it
        divisible = [["tt.divisibility", 16]]
    for i, (name, kind) in enumerate(source.signature.items()):
        if kind.startswith("*") or re.fullmatch(r"s[a-z]+0", name):
            attrs[(i,)] = divisible
        elif re.fullmatch(r"s[a-z]+1", name):
            signature[name], constexprs[name] = "constexpr", 1
    return signature, constexprs, attrs


def aot_compile(kernel: str | Kernel, target: str, num_warps: int | None = None, num_stages: int | None = None,
                typical: bool | None = None):
    """Compile a generated kernel (by name, see generated_kernels(), or the Kernel) for "sm_80", "sm_87", "sm_90"
    or "gfx942"; warps and stages default to the variant's own, else the tuning table's. `typical` specialises it
    as Triton does for aligned, row-major operands (see _specialised); False compiles the generic kernel; None (the
    default): as the variant was planned (Source.aligned).
    Returns Triton's CompiledKernel (its .asm holds ptx/cubin or amdgcn/hsaco); raises on any compile error and
    AOTError on a shared-memory overflow or a register spill."""
    if imported_for_interpreter():
        raise RuntimeError("triton was imported under TRITON_INTERPRET=1: compile ahead of time in a process "
                           "without it (the interpreter replaces the Triton library functions kernels call)")
    if isinstance(kernel, str):
        kernel = generated_kernels()[kernel]
    cfg = CONFIGS[kernel.source.op][target]
    options = {"num_warps": num_warps or kernel.source.num_warps or cfg["num_warps"],
               "num_stages": num_stages or kernel.source.num_stages or cfg["num_stages"],
               "enable_fp_fusion": True}      # Triton's default, stated (Triton 3.9 warns when it is left implicit)
    typical = kernel.source.aligned if typical is None else typical
    signature, constexprs, attrs = _specialised(kernel.source, target, typical)
    src = ASTSource(fn=kernel.jit_function(), signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with _ptxas_log_to(log if GPU_TARGETS[target].backend == "cuda" else None):
        compiled = triton.compile(src, target=GPU_TARGETS[target], options=options)
    compiled.sparsecc_ptxas_log = log.getvalue() or None      # None: Triton's cache answered, ptxas did not run
    if compiled.metadata.shared > SHARED_MEMORY[target]:
        raise AOTError(f"{kernel.name} on {target} needs {compiled.metadata.shared} bytes of shared memory, "
                       f"the target has {SHARED_MEMORY[target]}")
    used = resources(compiled)
    if spills_registers(used, GPU_TARGETS[target].backend):
        raise AOTError(f"{kernel.name} on {target} spills registers: {used}")
    return compiled


def spills_registers(used: dict, backend: str) -> bool:
    """Whether a kernel spills registers to memory because it needs more than it has: on CUDA, spills at the
    255-register limit or of more than 64 bytes; on gfx942, any VGPR spill or scratch. (Triton 3.9 runs ptxas 13
    with --regAllocOptLevel=2, which leaves a few bytes of spill in some kernels far below the limit, e.g. 8 bytes
    at 40 registers; the same PTX has none without that option, and Triton 3.6's ptxas 12.8 does not use it.)"""
    if not used["spills"]:
        return False
    if backend == "cuda":
        return used["registers"] is None or used["registers"] >= 255 or used["spills"] > 64
    return True


def _resource_cache() -> Path:
    return cache_dir() / "triton" / f"aot-resources-triton{triton.__version__}.json"


def resources(compiled) -> dict:
    """What a compiled kernel uses: shared memory (bytes), registers per thread, and bytes spilled to memory
    (CUDA: ptxas spill stores + loads; gfx942: VGPR spill slots + scratch size). None where unknown. Kept on disk
    by the compiled kernel's hash (Triton's own cache key), so a kernel Triton's cache returns needs no ptxas run."""
    path, key = _resource_cache(), f"{compiled.hash}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    out = _resources(compiled)
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        known[key] = out
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(path)
    except (OSError, ValueError):     # a cache is never worth an error
        pass
    return out


def _resources(compiled) -> dict:
    target = compiled.metadata.target
    out = {"shared": compiled.metadata.shared, "registers": None, "spills": None}
    if target.backend == "cuda":
        log = getattr(compiled, "sparsecc_ptxas_log", None) or _ptxas_log(compiled.asm["ptx"], target.arch,
                                                                         compiled.metadata)
        stores = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log))
        loads = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", log))
        regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
        out.update(spills=stores + loads, registers=max(regs) if regs else None)
    elif target.backend == "hip":
        asm = compiled.asm["amdgcn"]
        vgpr_spills = sum(int(v) for v in re.findall(r"\.vgpr_spill_count:\s*(\d+)", asm))
        scratch = sum(int(v) for v in re.findall(r"; ScratchSize: (\d+)", asm))
        regs = [int(v) for v in re.findall(r"\.vgpr_count:\s*(\d+)", asm)]
        out.update(spills=vgpr_spills + scratch, registers=max(regs) if regs else None)
    return out


@contextlib.contextmanager
def _ptxas_log_to(sink):
    """Collect the ptxas -v report Triton's own ptxas run prints when knobs.nvidia.dump_ptxas_log is set (Triton
    3.6 and 3.9 run ptxas with -v and print its log then), so the spill check needs no second ptxas run."""
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if sink is None or nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        yield
        return
    old = nvidia.dump_ptxas_log
    nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        nvidia.dump_ptxas_log = old


def _ptxas_log(ptx: str, capability: int, metadata) -> str:
    """ptxas -v's report on the PTX, run as Triton runs it (its bundled ptxas, the target's sm name, -lineinfo,
    --fmad as the kernel was compiled)."""
    from triton.backends.nvidia import compiler as nvidia
    tool = nvidia.get_ptxas(capability)
    arch = nvidia.sm_arch_from_capability(capability)
    fmad = [] if getattr(metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([tool.path, "-lineinfo", *fmad, "-v", f"--gpu-name={arch}", path, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if run.returncode:
        raise AOTError(f"ptxas -v failed: {run.stderr[-2000:]}")
    return run.stdout + run.stderr


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
