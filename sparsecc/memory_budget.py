"""memory_budget: where the one-graph step sits on the time/memory trade-off — how much of the forward the
backward recomputes instead of keeping — chosen so that the modelled peak fits a byte budget with the least
recomputation.

The rematerialize pass hands that choice to PyTorch's min-cut partitioner, whose activation_memory_budget
(a fraction: 1 keeps what the min-cut keeps, 0 recomputes everything it may) ranks what to recompute by its
estimated runtime per byte saved. fit() runs the step's passes at a few fractions (a grid, then bisection)
and keeps the fraction with the fewest FLOPs whose modelled peak fits: memory.liveness of the final graph,
i.e. the bytes allocated during the step above the resident parameters, optimizer state and batch
(fused=True: as Inductor runs it). A budget below the lowest peak any tried fraction reaches (the floor) is a
ConfigError that states the floor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ._torch import functorch_config
from .analysis import split_flops
from .errors import ConfigError, human
from .graph import clone_graph_module
from .memory import liveness
from .passes import Plan
from .pipeline import run_passes

GRID = (1.0, 0.75, 0.5, 0.25, 0.0)   # activation_memory_budget fractions tried first, in this order
BISECTION_STEPS = 3


@dataclass(frozen=True)
class Point:
    """One point of the trade-off: the partitioner's fraction, the step's modelled peak, its FLOPs and ops
    (recomputed elementwise ops add ops but no counted FLOPs)."""

    fraction: float
    peak: int
    flops: int
    ops: int

    def describe(self) -> str:
        return f"fraction {self.fraction:.3f}: peak {human(self.peak)}, {self.flops / 1e9:.3f} GFLOP, {self.ops} ops"


@dataclass
class Fitted:
    graph: fx.GraphModule           # the step after the passes at the chosen fraction
    results: list                   # their PassResults
    graphs: dict                    # their graphs as text
    chosen: Point
    points: list[Point]             # every fraction tried, by fraction


def _attempt(joint: fx.GraphModule, plan: Plan, passes, fraction: float, fused: bool):
    gm = clone_graph_module(joint)
    gm.meta.update(joint.meta)
    with functorch_config.patch(activation_memory_budget=fraction):
        results, graphs = run_passes(gm, plan, passes)
    ops = sum(n.op == "call_function" for n in gm.graph.nodes)
    peak = liveness(gm, fused=fused).peak
    return gm, results, graphs, Point(fraction, peak, sum(split_flops(gm, plan.num_fwd_outputs)), ops)


def fit(joint: fx.GraphModule, plan: Plan, passes, budget: int, *, fused: bool = False) -> Fitted:
    """The passes run on copies of joint at the fraction with the least recomputation (fewest FLOPs, then ops) whose
    modelled peak is at most budget bytes. The peak is not monotone in the fraction (recomputing everything
    can move work to where more is live; the rematerialize pass then keeps the unpartitioned graph), so a
    coarse grid is tried first and the boundary found on it is refined by bisection."""
    tried = {}

    def at(fraction):
        if fraction not in tried:
            tried[fraction] = _attempt(joint, plan, passes, fraction, fused)
        return tried[fraction]

    if at(1.0)[3].peak > budget:
        fits = next((f for f in GRID[1:] if at(f)[3].peak <= budget), None)
        if fits is None:
            floor = min((t[3] for t in tried.values()), key=lambda p: p.peak)
            raise ConfigError(
                f"memory_budget {human(budget)} is below the lowest peak found for this step: {human(floor.peak)} "
                f"(modelled; {human(tried[1.0][3].peak)} without extra recomputation). Give at least "
                f"{human(floor.peak)}, train fewer parameters (update=) or use a smaller batch")
        lo, hi = fits, GRID[GRID.index(fits) - 1]        # the peak fits at lo, not at hi
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at(mid)[3].peak <= budget else (lo, mid)
    fitting = [t for t in tried.values() if t[3].peak <= budget]
    best = min(fitting, key=lambda t: (t[3].flops, t[3].ops, -t[3].fraction))
    points = sorted((t[3] for t in tried.values()), key=lambda p: p.fraction)
    return Fitted(best[0], best[1], best[2], best[3], points)
