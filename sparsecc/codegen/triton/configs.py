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
    # block_spmm: output tile [BLOCK_M tokens, b]; one b x b block per step (b is the pattern's).
    "block_spmm": _table((64, 4, 3), (32, 4, 2), (128, 8, 3), (64, 4, 2), (16, 1, 1), keys=("BLOCK_M",)),
    # block_sddmm: output tile [b, b] (one block); BLOCK_K tokens per step.
    "block_sddmm": _table((64, 4, 3), (32, 4, 2), (64, 8, 3), (32, 4, 2), (32, 1, 1), keys=("BLOCK_K",)),
    # csr_spmm: output [BLOCK_M tokens] of one row; BLOCK_K nonzeros of the row per step.
    "csr_spmm": _table((64, 32, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (16, 16, 1, 1),
                       keys=("BLOCK_M", "BLOCK_K")),
    # csr_sddmm: output [BLOCK_N nonzeros] of one row; BLOCK_K tokens per step.
    "csr_sddmm": _table((32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (16, 16, 1, 1),
                        keys=("BLOCK_N", "BLOCK_K")),
    # nm_mm: output [BLOCK_M tokens, BLOCK_N weight rows]; BLOCK_K input columns (whole N:M groups) per step.
    "nm_mm": _table((64, 64, 32, 4, 3), (32, 64, 32, 4, 2), (128, 64, 64, 8, 3), (64, 64, 32, 4, 2),
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
