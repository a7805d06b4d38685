"""The compiler, on one screen: the ordered passes over the joint graph, each checked and recorded."""
from __future__ import annotations

import re
import time

import torch.fx as fx

from .config import rule_name
from .graph import output_values
from .passes import PassResult, Plan
from .passes.all_reduce_gradients import all_reduce_gradients
from .passes.fuse_linear_cross_entropy import fuse_linear_cross_entropy
from .passes.fuse_optimizer import fuse_optimizer
from .passes.prune_backward import prune_backward
from .passes.rematerialize import rematerialize
from .passes.reorder_for_memory import reorder_for_memory
from .passes.share_matmul_operands import share_matmul_operands
from .passes.subtensor_grads import subtensor_grads
from .passes.swiglu_backward_in_place import swiglu_backward_in_place
from .report import Report, register

CAPTURE_PASSES = [     # on the captured forward + loss of a training step, before the joint trace
    fuse_linear_cross_entropy,   # output projection + cross-entropy chunked over tokens: no full logits
]
PASSES = [
    prune_backward,      # frozen parameters get no gradient; DCE removes what only served them
    subtensor_grads,     # Channels rules: weight gradients for the selected channels only
]
TRAIN_STEP_PASSES = PASSES + [
    rematerialize,       # min-cut choice of what backward keeps vs recomputes, in one graph
    fuse_optimizer,      # each update right after its gradient; gradients become new params + state
    swiglu_backward_in_place,  # a gated MLP's two backward gradients written into the inputs that die there
    reorder_for_memory,  # schedule the whole step for a lower peak of live bytes
    share_matmul_operands,  # a value an mm reads through a reshape is one buffer for all its readers (Inductor)
]
DATA_PARALLEL_STEP_PASSES = PASSES + [   # compile_train_step(..., process_group=...)
    rematerialize,
    all_reduce_gradients,  # average the kept gradients (k channels of a Channels weight) over ranks, in buckets
    fuse_optimizer,
    swiglu_backward_in_place,
    reorder_for_memory,
    share_matmul_operands,
]
HOST_ONLY_PASSES = (swiglu_backward_in_place,   # sparsecc:: ops even on the CPU path,
                    share_matmul_operands)     # for Inductor's lowering: not in portable graphs


class PassVerificationError(RuntimeError):
    """A pass left the graph in a state that breaks an invariant; the message names the pass."""


_FREES = re.compile(r";  (?:\w+ = )+None$")


def readable(gm: fx.GraphModule) -> str:
    """The graph as code with shapes, without the source-location comments tracing leaves behind and
    without codegen's `;  x = None` frees (they change with every user and would clutter each diff)."""
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    return "\n".join(_FREES.sub("", line) for line in code.splitlines()
                     if not line.lstrip().startswith(("# File:", "# No stacktrace")) and line.strip() != "")


def verify(gm: fx.GraphModule, plan: Plan, n_outputs: int, pass_name: str) -> None:
    """Invariants every pass must keep: a well-formed graph, fake values on every op that returns something,
    the output layout
    (one gradient per parameter, shaped like it; after fuse_optimizer, the forward outputs alone)."""
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - re-raised with the pass named
        raise PassVerificationError(f"after pass {pass_name}: graph.lint failed: {e}") from e
    for node in gm.graph.nodes:
        returns = getattr(getattr(node.target, "_schema", None), "returns", [None])
        if node.op == "call_function" and returns and "val" not in node.meta:
            raise PassVerificationError(f"after pass {pass_name}: node {node.name} ({node.target}) has no meta['val']")
    outs = output_values(gm)
    updates = gm.meta.get("sparsecc_updates")
    if updates is not None:          # updates are written in place: only the forward outputs remain
        n_outputs = plan.num_fwd_outputs
    if len(outs) != n_outputs:
        raise PassVerificationError(f"after pass {pass_name}: {len(outs)} outputs, expected {n_outputs}")
    for p in plan.params if updates is None else ():
        grad = outs[plan.grad_position(p)]
        if grad is not None and tuple(grad.meta["val"].shape) != p.shape:
            raise PassVerificationError(
                f"after pass {pass_name}: gradient of {p.name} has shape {tuple(grad.meta['val'].shape)}, expected {p.shape}")


COUNTS = ("grads_pruned", "grads_sliced", "nodes_removed", "updates_fused", "losses_fused", "logits_bytes_avoided",
          "sparse_ops", "sparse_refused", "sparse_flops_saved")   # passes' counts a report sums


def assemble_report(plan: Plan, results: list[PassResult], graphs: dict[str, str], stats: dict,
                    timeline=None) -> Report:
    """How both entry points record a compilation: each parameter's rule, every pass's result and graph, the
    entry point's own measures (stats) and the passes' summed COUNTS; registered for sparsecc.reports()."""
    report = Report(graphs=graphs, passes=results, params=[(p.name, rule_name(p.rule), p.shape) for p in plan.params],
                    timeline=timeline)
    report.stats = {**stats, **totals(results, *COUNTS)}
    register(report)
    return report


def totals(results: list[PassResult], *keys: str) -> dict[str, int]:
    """The sum over passes of each named count."""
    return {k: sum(r.counts.get(k, 0) for r in results) for k in keys}


def run_passes(joint: fx.GraphModule, plan: Plan, passes=PASSES) -> tuple[list[PassResult], dict[str, str]]:
    """Rewrite the joint graph in place; return each pass's result and the graph's code after it."""
    graphs = {"joint/input": readable(joint)}
    results = []
    n_outputs = len(output_values(joint))
    for fn in passes:
        start = time.perf_counter()
        result = fn(joint, plan)
        result.seconds = time.perf_counter() - start
        verify(joint, plan, n_outputs, fn.__name__)
        graphs[f"joint/after {fn.__name__}"] = readable(joint)
        results.append(result)
    return results, graphs
