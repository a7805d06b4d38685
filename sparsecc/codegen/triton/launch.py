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
import dataclasses
import functools
import math

import torch
import triton

from . import templates, tune
from .configs import FMA_CAPS, SHARED_MEMORY, SMS, WARP_SIZE, candidates, config, fit, next_pow2
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


def _fma_dot(target: str, variant: dict) -> bool:
    """Whether the variant's tl.dot runs on the FMA units with its operand tiles in registers: fp32 in "ieee"
    precision on a GPU target (the interpreter has no such limit)."""
    return target != "interpreter" and variant["dtype"] == "fp32" and variant["precision"] == "ieee"


def _fma_capped(kernel: str, target: str, variant: dict, cfg: dict) -> dict:
    """cfg with configs.FMA_CAPS applied when the variant's tl.dot runs on the FMA units (_fma_dot), so its
    operand tiles fit in registers."""
    if not _fma_dot(target, variant):
        return cfg
    return {k: min(v, FMA_CAPS[kernel].get(k, v)) for k, v in cfg.items()}


def _index(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def _run(source: templates.Source, grid: tuple[int, ...], args: tuple, cfg: dict) -> None:
    if _planning is not None:        # with the warps and stages it would launch with, for aot_compile
        _planning[1].append(dataclasses.replace(source, num_warps=source.num_warps or cfg["num_warps"],
                                                num_stages=source.num_stages or cfg["num_stages"]))
        return
    if source.scratch:               # device-side tensor descriptors live in global scratch memory that Triton asks
        triton.set_allocator(_scratch)   # for at launch (the allocator is per thread: autograd's backward has its own)
    generate(source).fn[grid](*args, num_warps=source.num_warps or cfg["num_warps"],
                              num_stages=source.num_stages or cfg["num_stages"])


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's global-scratch allocator: bytes from torch's caching allocator on the current device."""
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def _tuned(target: str, device: torch.device, key: str, variants: list[tuple[templates.Source, dict]], run):
    """Run the fastest of the variants (source, config) for this call: run(source, cfg) launches one and returns
    the result. Planning records every variant's source (the interpreter's: the first) and launches nothing; on a
    GPU the autotuner picks (tune.pick: timed once per device and tuning key, then cached); else the first."""
    variants = list({src.name: (src, cfg) for src, cfg in variants}.values())   # e.g. a TMA candidate that cannot
    if _planning is not None:                                                     # use TMA here is another's twin
        _planning[1].extend(src for src, _ in (variants[:1] if target == "interpreter" else variants))
        return None
    if target == "interpreter" or device.type != "cuda":
        return run(*variants[0])
    return run(*tune.pick(key, variants, run, device))


def _sms(target: str, device: torch.device) -> int:
    """Multiprocessors to fill: the device's own count on a GPU, the target's table value otherwise."""
    if _planning is None and target != "interpreter" and device.type == "cuda":
        return _device_sms(device.index if device.index is not None else torch.cuda.current_device())
    return SMS[target]


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _class(n: int) -> int:
    """A size's shape class for tuning keys: its power of two, clamped to [16, 16384]."""
    return min(max(next_pow2(max(n, 1)), 16), 16384)


class _Memo:
    """Index structures derived from a sparse weight's index tensors (sorted orders, pointers, tile tables), kept
    while those tensors are unchanged: the key holds each tensor's data pointer, layout and version counter (bumped
    by the in-place updates of a mask change, shared by every alias of the tensor) and the entry holds the tensors,
    so no other tensor can take their memory while it lives. Saves a few small kernels per call (sorts, searches)
    that would cost more than the sparse GEMM itself on small layers."""

    def __init__(self, size: int = 64):
        self.size, self.entries = size, {}

    def get(self, make, tensors: tuple[torch.Tensor, ...], *extra):
        try:
            key = (tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride(), str(t.device))
                         for t in tensors), extra)
        except RuntimeError:                # inference tensors have no version counter: no memo
            return make()
        hit = self.entries.get(key)
        if hit is not None:
            return hit[1]
        value = make()
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (tensors, value)
        return value


_MEMO = _Memo()


# --- block-sparse ----------------------------------------------------------------------------------------------

def _rows_first(dst: torch.Tensor, src: torch.Tensor, n_rows: int):
    """(ptr, order, src in that order, block-rows by decreasing count) of blocks grouped by destination block-row."""
    sorted_dst, order = torch.sort(_index(dst), stable=True)      # searchsorted, unlike bincount, needs no host sync
    ptr = torch.searchsorted(sorted_dst, torch.arange(n_rows + 1, device=dst.device))
    heaviest = torch.sort(ptr[1:] - ptr[:-1], descending=True, stable=True).indices
    return ptr, order, _index(src)[order], heaviest


def _tma_ok(b: int, smallest: int, aligned: bool, target: str, variant: dict) -> bool:
    """Whether a block kernel loads its operands through tensor descriptors: blocks of a power-of-two size of at
    least `smallest` (below it a tile has no edge of 64 for Hopper's wgmma), operands aligned as TMA needs (16-byte
    base and row strides), and not an FMA dot (_fma_dot: its operands sit in registers, where a whole b x b block
    per step spills)."""
    return aligned and b >= smallest and next_pow2(b) == b and not _fma_dot(target, variant)


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether Triton specialises a kernel on these operands as aligned: 16-byte aligned data and row strides that
    are multiples of 16 elements (then loads vectorise and pipeline; otherwise the launchers take smaller tiles)."""
    return all(t.data_ptr() % 16 == 0 and (t.dim() < 2 or t.stride(0) % 16 == 0) for t in tensors)


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (the kernels' dense operands): t itself when it has one."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def block_spmm(x: torch.Tensor, values: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, n_dst: int) -> torch.Tensor:
    """y [N, n_dst]: y[:, dst[k]*b:+b] += x[:, src[k]*b:+b] @ values[k]^T. Forward of x @ W^T: (x, values, rows,
    cols, n_out); input gradient g @ W: (g, values.transpose(1, 2), cols, rows, n_in) (read through strides)."""
    n, b = x.shape[0], values.shape[-1]
    target = target_of(x.device)
    variant = _matmul_variant(target, x, values)
    if n == 0 or values.shape[0] == 0:
        return x.new_zeros(n, n_dst)
    values_t = not values.is_contiguous() and values.transpose(1, 2).is_contiguous()
    v = values.transpose(1, 2) if values_t else values.contiguous()    # contiguous storage either way
    x = _unit_columns(x)
    n_rows = n_dst // b
    ptr, order, src_sorted, heaviest = _MEMO.get(lambda: _rows_first(dst, src, n_rows), (dst, src), n_rows)
    elt = x.element_size()
    aligned = target == "interpreter" or _aligned(x, v)

    def variant_of(cfg):
        cfg = dict(cfg, TMA=int(cfg["TMA"] and _tma_ok(b, 16, aligned, target, variant)))
        if cfg["TMA"]:
            cfg["BLOCK_K"] = b              # one block per step
        cfg = fit(cfg, target, "BLOCK_M", max(cfg["BLOCK_K"], next_pow2(b)), next_pow2(b), elt,
                  fma_dot=_fma_dot(target, variant))
        if not aligned:                     # unvectorised, unpipelined loads hold more registers: smaller tiles
            cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 64), num_stages=1)
        return templates.block_spmm(b=b, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                                    values_t=values_t, tma=bool(cfg["TMA"]), aligned=aligned,
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **variant), cfg

    def run(source, cfg):
        y = x.new_empty(n, n_dst)
        _run(source, (triton.cdiv(n, cfg["BLOCK_M"]) * n_rows,),
             (x, v, y, ptr, order, src_sorted, heaviest, n, n_rows, x.stride(0), y.stride(0), x.shape[1],
              v.shape[0]), cfg)
        return y

    variants = [variant_of(c) for c in candidates("block_spmm", target, BLOCK_M=n)]
    per_row = _class(values.shape[0] // max(n_rows, 1))
    key = f"block_spmm {variant['dtype']} b{b} vt{int(values_t)} N{_class(n)} blocks/row{per_row}"
    y = _tuned(target, x.device, key, variants, run)
    return x.new_empty(n, n_dst) if y is None else y


def _row_tiles(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, nb: int):
    """(t_row, t_start, t_end, order, cols in that order) of tiles of up to nb blocks of one block-row, over the
    blocks sorted by block-row; the table has nnzb // nb + min(n_rows, nnzb) + 1 tiles (an upper bound, known
    without a host sync), the unused ones empty."""
    sorted_rows, order = torch.sort(_index(rows), stable=True)
    cols_sorted = _index(cols)[order]
    nnzb = rows.shape[0]
    if nb == 1:
        start = torch.arange(nnzb, device=rows.device)
        return sorted_rows, start, start + 1, order, cols_sorted
    ptr = torch.searchsorted(sorted_rows, torch.arange(n_rows + 1, device=rows.device))
    per_row = (ptr[1:] - ptr[:-1] + nb - 1) // nb                 # tiles of each block-row
    cum = torch.cumsum(per_row, 0)
    t = torch.arange(nnzb // nb + min(n_rows, nnzb) + 1, device=rows.device)
    row = torch.searchsorted(cum, t, right=True).clamp(max=n_rows - 1)
    start = ptr[row] + (t - (cum[row] - per_row[row])) * nb
    end = torch.minimum(start + nb, ptr[row + 1])
    used = t < cum[-1]
    start = torch.where(used, start, 0)
    return row, start, torch.where(used, end, 0), order, cols_sorted


def _fit_sddmm(cfg: dict, target: str, bp: int, elt: int, fma_dot: bool) -> dict:
    """block_sddmm's config shrunk to fit the target (see configs.fit): num_stages copies of a [b, BLOCK_K] g tile
    and a [BLOCK_K, BLOCK_N] x tile in 90 % of the shared memory, a [b, BLOCK_N] fp32 accumulator of at most 64
    registers per thread (fp32 "ieee" dots, on the FMA units: operands and accumulator at most 96); fewer stages
    first, then fewer tokens per step, then fewer blocks per tile."""
    cfg["BLOCK_N"] = max(cfg["BLOCK_N"], bp)
    if target == "interpreter":
        return cfg
    limit, threads = 0.9 * SHARED_MEMORY[target], cfg["num_warps"] * WARP_SIZE[target]

    def smem():
        return cfg["num_stages"] * cfg["BLOCK_K"] * (bp + cfg["BLOCK_N"]) * elt

    while smem() > limit and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    def regs():
        operands = cfg["BLOCK_K"] * (bp + cfg["BLOCK_N"]) if fma_dot else 0
        return (bp * cfg["BLOCK_N"] + operands) / threads

    budget = 96 if fma_dot else 64
    if fma_dot:                         # FMA dots keep their operand tiles in registers: small tiles
        cfg["BLOCK_K"], cfg["BLOCK_N"] = 16, min(cfg["BLOCK_N"], max(64, bp))
    while (smem() > limit or regs() > budget) and cfg["BLOCK_K"] > 16:
        cfg["BLOCK_K"] //= 2
    while (smem() > limit or regs() > budget) and cfg["BLOCK_N"] > bp:
        cfg["BLOCK_N"] //= 2
    return cfg


def block_sddmm(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """out [nnzb, b, b]: out[k] = g[:, rows[k]*b:+b]^T @ x[:, cols[k]*b:+b]."""
    target = target_of(x.device)
    variant = _matmul_variant(target, g, x)
    nnzb, n = rows.shape[0], g.shape[0]
    if nnzb == 0:
        return x.new_empty(0, b, b)
    if n == 0:
        return x.new_zeros(nnzb, b, b)
    g, x = _unit_columns(g), _unit_columns(x)
    n_rows, bp = g.shape[1] // b, next_pow2(b)
    sms, elt = _sms(target, x.device), x.element_size()
    min_steps = 1 if target == "interpreter" else 4           # token steps per split at least
    aligned = target == "interpreter" or _aligned(g, x)

    def variant_of(cfg):
        cfg = dict(cfg, TMA=int(cfg["TMA"] and _tma_ok(b, 64, aligned, target, variant)))
        if cfg["TMA"]:
            cfg["BLOCK_N"] = b              # one block per tile
        cfg = _fit_sddmm(cfg, target, bp, elt, _fma_dot(target, variant))
        if not aligned:                     # unvectorised, unpipelined loads hold more registers: smaller tiles
            cfg.update(BLOCK_N=min(cfg["BLOCK_N"], max(64, bp)), num_stages=1)
        nb = 1 if bp < 16 else max(1, cfg["BLOCK_N"] // bp)
        tiles = triton.cdiv(nnzb, nb)
        splits = 1
        if tiles < 2 * sms:
            splits = max(1, min(triton.cdiv(2 * sms, tiles), n // (min_steps * cfg["BLOCK_K"])))
        chunk = triton.cdiv(triton.cdiv(n, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        splits = triton.cdiv(n, chunk)
        cfg.update(NB=nb, splits=splits, chunk=chunk)
        return templates.block_sddmm(b=b, BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], split=splits > 1,
                                     tma=bool(cfg["TMA"]), aligned=aligned, num_warps=cfg["num_warps"],
                                     num_stages=cfg["num_stages"], **variant), cfg

    def run(source, cfg):
        t_row, t_start, t_end, order, cols_sorted = _MEMO.get(
            lambda: _row_tiles(rows, cols, n_rows, cfg["NB"]), (rows, cols), n_rows, cfg["NB"])
        splits = cfg["splits"]
        out = torch.empty(splits, nnzb, b, b, dtype=torch.float32, device=x.device) if splits > 1 else \
            x.new_empty(nnzb, b, b)
        _run(source, (t_row.shape[0], splits),
             (g, x, out, t_row, t_start, t_end, order, cols_sorted, n, cfg["chunk"], nnzb, g.stride(0), x.stride(0),
              g.shape[1], x.shape[1]),
             cfg)
        return out.sum(0).to(x.dtype) if splits > 1 else out

    variants = [variant_of(c) for c in candidates("block_sddmm", target, BLOCK_K=n)]
    key = f"block_sddmm {variant['dtype']} b{b} N{_class(n)} blocks{_class(nnzb)}"
    out = _tuned(target, x.device, key, variants, run)
    return x.new_empty(nnzb, b, b) if out is None else out


# --- CSR: row-split on the transposed dense operands ------------------------------------------------------------

def csr_spmm(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_out: int,
             perm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T, W [n_out, x.shape[1]] in CSR. The input gradient g @ W is csr_spmm(g, t_crow, t_col, values,
    n_in, perm=t_perm): W^T's CSR reading W's values through t_perm (no permuted copy). Row-split: x is read
    transposed (one copy, [n_in, N]), so each nonzero reads a contiguous run of tokens."""
    n = x.shape[0]
    target = target_of(x.device)
    dtype = _dtype(x, values)
    if n == 0 or n_out == 0:
        return x.new_empty(n, n_out)
    per_row = math.ceil(col.shape[0] / n_out)
    xt = x.t().contiguous()
    extra = (_index(perm),) if perm is not None else ()
    values, crow, col = values.contiguous(), _index(crow), _index(col)

    def run(source, cfg):
        yt = x.new_empty(n_out, n)
        _run(source, (n_out, triton.cdiv(n, cfg["BLOCK_N"])), (xt, values, crow, col, *extra, yt, n), cfg)
        return yt.t().contiguous()

    variants = [(templates.csr_spmm(dtype, c["BLOCK_N"], c["BLOCK_K"], permuted=perm is not None,
                                    num_warps=c["num_warps"], num_stages=c["num_stages"]), c)
                for c in candidates("csr_spmm", target, BLOCK_N=n, BLOCK_K=per_row)]
    y = _tuned(target, x.device, f"csr_spmm {dtype} N{_class(n)} nnz/row{_class(per_row)}", variants, run)
    return x.new_empty(n, n_out) if y is None else y


def csr_sddmm(g: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """vals [nnz]: vals[p] = sum_t g[t, row(p)] * x[t, col[p]] (row-split on g^T and x^T, one copy each)."""
    target = target_of(x.device)
    dtype = _dtype(g, x)
    n_out, nnz, n = crow.shape[0] - 1, col.shape[0], g.shape[0]
    if nnz == 0:
        return x.new_empty(0)
    if n == 0:
        return x.new_zeros(nnz)
    gt, xt = g.t().contiguous(), x.t().contiguous()
    crow, col = _index(crow), _index(col)

    def run(source, cfg):
        out = x.new_empty(nnz)
        _run(source, (n_out,), (gt, xt, crow, col, out, n), cfg)
        return out

    per_row = math.ceil(nnz / n_out)
    variants = [(templates.csr_sddmm(dtype, c["BLOCK_N"], c["BLOCK_K"], num_warps=c["num_warps"],
                                     num_stages=c["num_stages"]), c)
                for c in candidates("csr_sddmm", target, BLOCK_K=n, BLOCK_N=per_row)]
    out = _tuned(target, x.device, f"csr_sddmm {dtype} N{_class(n)} nnz/row{_class(per_row)}", variants, run)
    return x.new_empty(nnz) if out is None else out


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
    cfg = config("nm_mm", target, BLOCK_M=num, BLOCK_N=n_out, BLOCK_K=n_in)
    cfg = _window(_fma_capped("nm_mm", target, variant, cfg), "BLOCK_K", m)
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
    cfg = config("nm_mm_t", target, BLOCK_M=num, BLOCK_N=n_in, BLOCK_K=n_out)
    cfg = _window(_fma_capped("nm_mm_t", target, variant, cfg), "BLOCK_N", m)
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
    cfg = config("nm_sddmm", target, BLOCK_M=n_out, BLOCK_N=n_in, BLOCK_K=num)
    cfg = _window(_fma_capped("nm_sddmm", target, variant, cfg), "BLOCK_N", m)
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
    cfg = _fma_capped("channels_wgrad", target, variant,
                      config("channels_wgrad", target, BLOCK_M=rows, BLOCK_N=cols, BLOCK_K=g.shape[0]))
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


def swiglu_backward(out: torch.Tensor, g: torch.Tensor, gate: torch.Tensor, which: str) -> None:
    """In place, all contiguous and of one shape: which="gate": out (up) <- g * up * silu'(gate); which="up": out (g
    itself; pass it as g too) <- g * silu(gate)."""
    if which not in ("gate", "up"):
        raise ValueError(f"which must be 'gate' or 'up', got {which!r}")
    dtype = _dtype(out, g, gate)
    if not (out.shape == g.shape == gate.shape and out.is_contiguous() and g.is_contiguous() and gate.is_contiguous()):
        raise ValueError(f"the SwiGLU backward takes contiguous tensors of one shape, got {tuple(out.shape)}, "
                         f"{tuple(g.shape)}, {tuple(gate.shape)}")
    n = out.numel()
    if n == 0:
        return
    cfg = config("swiglu_backward", target_of(out.device))
    _run(templates.swiglu_backward(dtype, cfg["BLOCK_N"], which), (triton.cdiv(n, cfg["BLOCK_N"]),),
         (out, *((g,) if which == "gate" else ()), gate, n), cfg)
