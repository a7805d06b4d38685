"""memory_budget: where a training graph sits on the time/memory trade-off — how much of the forward the
backward recomputes instead of keeping — chosen so that the modelled peak fits a byte budget with the least
recomputation.

PyTorch's min-cut partitioner makes that choice; its activation_memory_budget (a fraction: 1 keeps what the
min-cut keeps, 0 recomputes everything it may) ranks what to recompute by estimated runtime per byte saved.
fit() evaluates a few fractions (a grid, then bisection at the boundary) and keeps the one with the fewest
FLOPs, then ops, whose modelled peak fits; a budget below the lowest peak found (the floor) is a ConfigError
that states the floor. The one-graph step evaluates a fraction by running its passes on a copy (the
rematerialize pass partitions), the backend by partitioning its joint graph (the peak is the larger of the
forward's and the backward's with the saved tensors it frees); each peak is the executor's model: Inductor's
buffer plan for the graph (inductor_memory.py; fractions giving the same graph are lowered once), the
liveness model (memory.py) for the eager executor.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._torch import functorch_config
from .analysis import graph_flops
from .errors import ConfigError, human
from .passes import PassResult

GRID = (1.0, 0.75, 0.5, 0.25, 0.0)   # activation_memory_budget fractions tried first, in this order
BISECTION_STEPS = 3


@dataclass(frozen=True)
class Point:
    """One point of the trade-off: the partitioner's fraction, the modelled peak, FLOPs and ops (recomputed
    elementwise ops add ops but no counted FLOPs)."""

    fraction: float
    peak: int
    flops: int
    ops: int

    def describe(self) -> str:
        return f"fraction {self.fraction:.3f}: peak {human(self.peak)}, {self.flops / 1e9:.3f} GFLOP, {self.ops} ops"


def point(fraction: float, peak: int, *graphs) -> Point:
    """The trade-off point of graphs (a whole step, or a forward and its backward) whose modelled peak is peak."""
    return Point(fraction, peak, sum(graph_flops(g) for g in graphs),
                 sum(n.op == "call_function" for g in graphs for n in g.graph.nodes))


def fit(evaluate, budget: int, what: str) -> tuple[object, PassResult]:
    """evaluate(fraction) -> (result, Point), called under activation_memory_budget=fraction. Returns the result
    at the fitting point with the least recomputation and the report entry listing every point tried; what
    names the graph in the floor's error ("this step")."""
    tried: dict[float, tuple[object, Point]] = {}

    def at(fraction):
        if fraction not in tried:
            with functorch_config.patch(activation_memory_budget=fraction):
                tried[fraction] = evaluate(fraction)
        return tried[fraction][1]

    if at(1.0).peak > budget:
        fits = next((f for f in GRID[1:] if at(f).peak <= budget), None)
        if fits is None:
            floor = min((p for _, p in tried.values()), key=lambda p: p.peak)
            raise ConfigError(
                f"memory_budget {human(budget)} is below the lowest peak found for {what}: {human(floor.peak)} "
                f"(modelled; {human(tried[1.0][1].peak)} without extra recomputation). Give at least "
                f"{human(floor.peak)}, train fewer parameters (update=) or use a smaller batch")
        lo, hi = fits, GRID[GRID.index(fits) - 1]        # the peak fits at lo, not at hi
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at(mid).peak <= budget else (lo, mid)
    result, chosen = min((t for t in tried.values() if t[1].peak <= budget),
                         key=lambda t: (t[1].flops, t[1].ops, -t[1].fraction))
    unbudgeted = tried[1.0][1]
    entry = PassResult("memory_budget")
    entry.counts.update(budget_bytes=budget, peak_bytes=chosen.peak, extra_flops=chosen.flops - unbudgeted.flops,
                        extra_ops=chosen.ops - unbudgeted.ops)
    entry.notes = [f"{'chosen ' if p == chosen else ''}{p.describe()}"
                   for p in sorted((p for _, p in tried.values()), key=lambda p: p.fraction)]
    return result, entry
