"""The tuning table: tile shapes, warps and pipeline stages per kernel and per GPU target.

CONFIGS[kernel][target] -> {BLOCK_*: tile edge, num_warps, num_stages}. Targets:
    sm_80        A100: 108 SMs, 163 KB shared memory per block. 64-wide tiles, 3 stages.
    sm_87        Jetson Orin: 16 SMs (AGX; fewer on NX/Nano), 163 KB shared, ~200 GB/s LPDDR5 shared with
                 the CPU. Half-size token tiles so that small batches still fill the SMs; 2 stages.
    sm_90        H100: 132 SMs, 227 KB shared. 128-row tiles and 8 warps (two warpgroups for wgmma).
    gfx942       MI300X: 304 CUs, 64 KB LDS per workgroup, 64-lane wavefronts. 64-wide tiles, 2 stages
                 (Triton's AMD stream pipeliner is tuned for 2), reduction tiles kept small for the LDS.
    interpreter  TRITON_INTERPRET=1 on CPU tensors (tests): 16/32 tiles, which interpret quickly.
These are documented starting points chosen from the hardware limits above, not measurements: no GPU was
available when they were written. benchmarks/bench_triton.py measures them on a real device.

TUNING[kernel][target] lists a few alternatives to each entry (other token tiles, warps, stages). On a real GPU
the launchers time the entry and its alternatives once per (device, dtype, block size, shape class) and keep the
fastest on disk (tune.py); in the interpreter, and when planning, the entry itself runs. Every alternative is
compiled ahead of time for its target by the tests, so none spills registers or overflows shared memory.
Block-sparse kernels (GPU GEMM practice): block_spmm's output tile is [BLOCK_M tokens, b], its K-loop walks the
block-row's stored blocks BLOCK_K // b at a time (a BLOCK_K-wide step however small b is), pipelined over
num_stages; programs are launched in groups of GROUP_M token tiles (L2 reuse of the weight blocks and of x).
block_sddmm's tile is [b, BLOCK_N] (BLOCK_N // b blocks of one block-row sharing their g slice; computed as its
transpose [BLOCK_N, b] for b < 64, so that tl.dot's M edge is BLOCK_N: Hopper's wgmma needs 64), BLOCK_K tokens
per step, split over the tokens (split-K, fp32 partials summed once) when there are too few tiles to fill the GPU.
Both have a TMA form (key TMA: operand tiles loaded through Hopper's tensor descriptors, one block per step or
tile), tuned as sm_90 alternatives.

Tile keys follow the GEMM convention of each kernel's output tile [BLOCK_M, BLOCK_N] and its reduction step
BLOCK_K; each kernel's template says what its rows, columns and reduction are. Shape classes shrink a tile edge
for a small extent: extents up to 16 get 16 (the smallest tl.dot edge), up to 64 get 64, larger ones the
table's edge. So a one-token batch runs 16-row tiles instead of 128-row ones, and few variants are compiled.
"""
from __future__ import annotations

TARGETS = ("sm_80", "sm_87", "sm_90", "gfx942")

# Shared memory one program may use, in bytes (the CUDA opt-in maximum per block; the LDS size on gfx942).
SHARED_MEMORY = {"sm_80": 166912, "sm_87": 166912, "sm_90": 232448, "gfx942": 65536}


def _table(sm_80, sm_87, sm_90, gfx942, interpreter, keys=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    """One kernel's row of the table from (tiles..., num_warps, num_stages) tuples."""
    def entry(values):
        *tiles, warps, stages = values
        return {**dict(zip(keys, tiles)), "num_warps": warps, "num_stages": stages}
    return {"sm_80": entry(sm_80), "sm_87": entry(sm_87), "sm_90": entry(sm_90), "gfx942": entry(gfx942),
            "interpreter": entry(interpreter)}


CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    # block_spmm: output tile [BLOCK_M tokens, b]; BLOCK_K input columns (BLOCK_K // b stored blocks) per step;
    # programs grouped GROUP_M token tiles at a time.
    # Its K-loop's loads depend on a loaded index (the block's column), which takes stages of their own: the
    # compiled kernels keep fewer tiles in flight than num_stages - 1 (b=64, 128-token tiles: sm_90 5 stages ->
    # 3 buffers, 4 -> 2; sm_80 5 -> 2, 4 -> 1; gfx942 4 -> 2), hence the deeper settings.
    # TMA: 1 loads the operands through tensor descriptors (Hopper's Tensor Memory Accelerator; one block per step,
    # so BLOCK_K is b), where the block size and alignment allow it (templates.block_spmm); an sm_90 alternative.
    "block_spmm": _table((128, 64, 8, 0, 4, 5), (64, 32, 8, 0, 4, 5), (128, 64, 8, 0, 8, 5), (128, 64, 8, 0, 4, 4),
                         (16, 32, 2, 0, 4, 2), keys=("BLOCK_M", "BLOCK_K", "GROUP_M", "TMA")),
    # block_sddmm: output tile [b, BLOCK_N] (BLOCK_N // b blocks of one block-row; [BLOCK_N, b] for b < 64);
    # BLOCK_K tokens per step. TMA: as for block_spmm (one block per tile, b >= 64, so the tile is wgmma's).
    "block_sddmm": _table((64, 128, 0, 4, 3), (32, 64, 0, 4, 2), (64, 128, 0, 4, 4), (32, 64, 0, 4, 2),
                          (16, 32, 0, 4, 2), keys=("BLOCK_K", "BLOCK_N", "TMA")),
    # csr_spmm (row-split): output [BLOCK_N tokens] of one sparse row, read from the transposed dense operand;
    # BLOCK_K nonzeros of the row per step.
    "csr_spmm": _table((256, 16, 4, 1), (128, 16, 4, 1), (256, 16, 4, 1), (256, 16, 4, 1), (16, 16, 1, 1),
                       keys=("BLOCK_N", "BLOCK_K")),
    # csr_sddmm (row-split): output [BLOCK_N nonzeros] of one sparse row; BLOCK_K tokens per step, read from the
    # transposed dense operands.
    "csr_sddmm": _table((16, 256, 4, 1), (16, 128, 4, 1), (16, 256, 4, 1), (16, 256, 4, 1), (16, 16, 1, 1),
                        keys=("BLOCK_N", "BLOCK_K")),
    # nm_mm: output [BLOCK_M tokens, BLOCK_N weight rows]; BLOCK_K input columns (whole N:M groups) per step.
    "nm_mm": _table((64, 64, 32, 4, 2), (32, 64, 32, 4, 2), (128, 64, 64, 8, 3), (64, 64, 32, 4, 2),
                    (16, 16, 16, 1, 1)),
    # nm_mm_t: output [BLOCK_M tokens, BLOCK_N input columns]; BLOCK_K weight rows per step.
    "nm_mm_t": _table((64, 64, 32, 4, 3), (32, 64, 32, 4, 2), (128, 64, 64, 8, 3), (64, 64, 32, 4, 2),
                      (16, 16, 16, 1, 1)),
    # nm_sddmm: output [BLOCK_M weight rows, BLOCK_N input columns]; BLOCK_K tokens per step.
    "nm_sddmm": _table((64, 64, 32, 4, 3), (64, 32, 32, 4, 2), (128, 64, 64, 8, 3), (64, 64, 32, 4, 2),
                       (16, 16, 16, 1, 1)),
    # channels_wgrad: output [BLOCK_M, BLOCK_N] of the k-channel gradient; BLOCK_K tokens per step.
    "channels_wgrad": _table((64, 64, 32, 4, 3), (64, 32, 32, 4, 2), (128, 128, 64, 8, 3), (64, 64, 32, 4, 2),
                             (16, 16, 16, 1, 1)),
    # sgd_rows / adamw_rows: elementwise over [BLOCK_M trained rows, BLOCK_N columns]; no reduction.
    "sgd_rows": _table((4, 256, 4, 1), (4, 256, 4, 1), (8, 256, 8, 1), (4, 256, 4, 1), (4, 32, 1, 1),
                       keys=("BLOCK_M", "BLOCK_N")),
    "adamw_rows": _table((4, 256, 4, 1), (4, 256, 4, 1), (8, 256, 8, 1), (4, 256, 4, 1), (4, 32, 1, 1),
                         keys=("BLOCK_M", "BLOCK_N")),
    # swiglu_backward: elementwise over BLOCK_N contiguous elements (8 per thread on 4-8 warps: 16-byte accesses).
    "swiglu_backward": _table((1024, 4, 1), (1024, 4, 1), (2048, 8, 1), (2048, 8, 1), (64, 1, 1), keys=("BLOCK_N",)),
}


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


SHAPE_CLASSES = (16, 64)   # tile edges for small extents: <= 16 -> 16, <= 64 -> 64, larger -> the table's


def shape_class(extent: int) -> int:
    """The largest tile edge useful for an extent: the smallest shape class holding it (unbounded above 64)."""
    return next((edge for edge in SHAPE_CLASSES if extent <= edge), 1 << 30)


def config(kernel: str, target: str, **extents: int) -> dict[str, int]:
    """The table's entry with each named tile edge shrunk to the shape class of its extent (see above)."""
    cfg = dict(CONFIGS[kernel][target])
    for key, extent in extents.items():
        cfg[key] = min(cfg[key], shape_class(extent))
    return cfg


# FMA dots (fp32 operands in "ieee" precision, the default unless torch allows TF32) keep both operand tiles in
# registers: the launchers cap their tiles (FMA_CAPS, and configs.fit for the block kernels) so none spills.
_NM_FMA = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4}
FMA_CAPS = {"nm_mm": _NM_FMA, "nm_mm_t": _NM_FMA, "nm_sddmm": _NM_FMA,
            "channels_wgrad": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}}

# Alternatives timed by the autotuner on a real GPU (tune.py), as (tiles..., num_warps, num_stages) in the keys of
# the kernel's CONFIGS row. Chosen from GPU GEMM practice: 64-256-row token tiles, 4-8 warps, 2-5 stages (Hopper
# has the shared memory for more stages than Ampere; Triton's AMD pipeliner is tuned for 2).
_ALTERNATIVES = {
    "block_spmm": {"sm_80": [(64, 64, 8, 0, 4, 6), (128, 64, 8, 0, 8, 5)],
                   "sm_87": [(32, 32, 4, 0, 4, 5)],
                   "sm_90": [(128, 64, 8, 0, 4, 6), (256, 64, 8, 0, 8, 4), (128, 64, 8, 1, 8, 5),
                             (256, 64, 8, 1, 8, 4)],
                   "gfx942": [(64, 64, 8, 0, 4, 4), (128, 64, 8, 0, 8, 4)]},
    "block_sddmm": {"sm_80": [(64, 64, 0, 4, 3), (32, 128, 0, 4, 4)],
                    "sm_87": [(64, 64, 0, 4, 2)],
                    "sm_90": [(64, 64, 0, 4, 4), (128, 128, 0, 8, 3), (64, 64, 1, 4, 5), (128, 64, 1, 4, 4)],
                    "gfx942": [(64, 64, 0, 4, 2), (32, 128, 0, 4, 2)]},
    "csr_spmm": {t: [(128, 32, 4, 1)] for t in ("sm_80", "sm_90", "gfx942")},
    "csr_sddmm": {t: [(32, 128, 4, 1)] for t in ("sm_80", "sm_90", "gfx942")},
}
TUNING: dict[str, dict[str, list[dict[str, int]]]] = {
    kernel: {target: [dict(zip([k for k in CONFIGS[kernel][target] if k not in ("num_warps", "num_stages")],
                               alt[:-2]), num_warps=alt[-2], num_stages=alt[-1]) for alt in alts]
             for target, alts in rows.items()}
    for kernel, rows in _ALTERNATIVES.items()}

# Streaming multiprocessors (CUs on gfx942) per target: how many tiles fill the GPU (split-K decisions). On a
# real device the launchers ask the device; the interpreter's 4 makes small test shapes exercise split-K.
SMS = {"sm_80": 108, "sm_87": 16, "sm_90": 132, "gfx942": 304, "interpreter": 4}
WARP_SIZE = {"sm_80": 32, "sm_87": 32, "sm_90": 32, "gfx942": 64, "interpreter": 32}


def candidates(kernel: str, target: str, **extents: int) -> list[dict[str, int]]:
    """config() and the kernel's alternatives for the target, each shrunk to the call's shape class, without
    duplicates; the first is the table's entry. The interpreter, and calls whose first extent (the tokens, or the
    rows of the output) is in a small shape class (<= 64), get the entry alone: small calls are latency-bound and
    the alternatives differ in the tiles such calls do not fill."""
    out = [config(kernel, target, **extents)]
    first = next(iter(extents.values()), 1 << 30)
    for alt in TUNING.get(kernel, {}).get(target, []) if target != "interpreter" and first > 64 else []:
        cfg = {**alt}
        for key, extent in extents.items():
            cfg[key] = min(cfg[key], shape_class(extent))
        if cfg not in out:
            out.append(cfg)
    return out


def fit(cfg: dict[str, int], target: str, a_rows: str, a_cols: int, b_cols: int, elt: int,
        fma_dot: bool = False) -> dict[str, int]:
    """A GEMM-like config shrunk until its pipeline fits the target: shared memory for num_stages copies of an
    [a_rows x a_cols] and an [a_cols x b_cols] tile of `elt`-byte elements within 90 % of the target's limit
    (fewer stages first, then a smaller a_rows tile), and an fp32 accumulator of at most 64 registers per thread
    (a smaller a_rows tile). `fma_dot`: fp32 tl.dot in "ieee" precision, which runs on the FMA units with both
    operand tiles in registers: those count too (at most 96 registers per thread for operands and accumulator).
    Keeps the variants the tests compile from spilling or overflowing on any target (an estimate: Triton keeps up
    to num_stages - 1 tiles in flight; the tests check the compiled kernels' real use)."""
    cfg = dict(cfg)
    if target == "interpreter":
        return cfg
    limit = 0.9 * SHARED_MEMORY[target]
    threads = cfg["num_warps"] * WARP_SIZE[target]

    def smem():
        return max(1, cfg["num_stages"] - 1) * (cfg[a_rows] * a_cols + a_cols * b_cols) * elt

    while smem() > limit and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    if fma_dot:                         # FMA dots keep their operand tiles in registers: at most 1024 elements
        cfg[a_rows] = min(cfg[a_rows], max(16, 1024 // a_cols))     # (checked by the tests' ptxas runs)
        cfg["num_warps"] = min(cfg["num_warps"], 4)

    def regs():
        tiles = cfg[a_rows] * b_cols + (cfg[a_rows] * a_cols + a_cols * b_cols if fma_dot else 0)
        return tiles / threads

    while (smem() > limit or regs() > (96 if fma_dot else 64)) and cfg[a_rows] > 16:
        cfg[a_rows] //= 2
    if cfg[a_rows] * b_cols <= 2048:    # a small tile (a small call's): one warpgroup is enough
        cfg["num_warps"] = min(cfg["num_warps"], 4)
    return cfg
