"""Static measures of partitioned graphs: FLOPs (from PyTorch's flop formulas) and bytes saved for backward."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from .graph import backward_nodes, nbytes, output_values, val


def graph_flops(gm: fx.GraphModule, only=None) -> int:
    """FLOPs of the matmuls, convolutions and attention kernels in the graph (what flop_counter counts),
    or in the nodes of `only`."""
    total = 0
    for node in gm.graph.nodes if only is None else only:
        if node.op != "call_function" or not hasattr(node.target, "overloadpacket"):
            continue
        formula = flop_registry.get(node.target.overloadpacket)
        if formula is not None:
            flops = formula(*val(node.args), out_val=node.meta.get("val"), **val(node.kwargs))
            total += int(flops) if isinstance(flops, int) else int(getattr(flops.node, "hint", 0) or 0)
    return total


def split_flops(gm: fx.GraphModule, num_fwd_outputs: int) -> tuple[int, int]:
    """(forward FLOPs, backward-and-update FLOPs) of a joint graph."""
    backward = backward_nodes(gm, num_fwd_outputs)
    total = graph_flops(gm)
    bwd = graph_flops(gm, backward)
    return total - bwd, bwd


def saved_tensors(fw: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    """Tensors the forward graph computes and keeps alive for backward (graph inputs excluded: they are
    resident anyway)."""
    saved = [n for n in output_values(fw)[num_fwd_outputs:] if isinstance(n, fx.Node)]
    return [n for n in saved if n.op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]


def saved_bytes(fw: fx.GraphModule, num_fwd_outputs: int) -> int:
    return sum(nbytes(n.meta["val"]) for n in saved_tensors(fw, num_fwd_outputs))


def count_ops(gm: fx.GraphModule, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)
