"""prune_backward: drop the gradient of every frozen parameter, then everything that only served it.

Once the frozen gradients are gone, dead-code elimination removes their GEMMs, the input-gradient
chain below the lowest trained parameter, and (after partitioning) every activation that was saved
only for them.
"""
from __future__ import annotations

from ..graph import output_values, set_output_values
from . import PassResult, Plan
from .dce import eliminate_dead_code


def prune_backward(gm, plan: Plan) -> PassResult:
    outs = output_values(gm)
    result = PassResult("prune_backward")
    for p in plan.params:
        pos = plan.grad_position(p)
        if p.rule == "frozen" and outs[pos] is not None:
            outs[pos] = None
            result.notes.append(f"{p.name}: gradient removed (frozen)")
    set_output_values(gm, outs)
    result.counts["grads_pruned"] = len(result.notes)
    result.counts["nodes_removed"] = eliminate_dead_code(gm)
    return result
