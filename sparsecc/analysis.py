"""Static measures of partitioned graphs: FLOPs (from PyTorch's flop formulas) and bytes saved for backward."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from .graph import backward_nodes, nbytes, output_values, val


_SPARSE_MM = {"block_sparse_mm", "block_sparse_mm_t", "csr_mm", "csr_mm_t", "nm_mm", "nm_mm_t"}   # [T, a] -> [T, b]
_SPARSE_SDDMM = {"block_sddmm", "csr_sddmm", "nm_sddmm"}      # g [T, out], x [T, in] -> values at stored entries


def dense_equivalent_flops(node: fx.Node) -> int | None:
    """For a sparsecc:: sparse GEMM, the FLOPs of the dense GEMM it stands for (the weight as a full matrix);
    None for any other node."""
    parts = str(node.target).split(".")
    if node.op != "call_function" or len(parts) < 2 or parts[0] != "sparsecc":
        return None
    if parts[1] in _SPARSE_MM:
        first, out = val(node.args[0]), node.meta.get("val")
        return 2 * _hint(first.numel()) * _hint(out.shape[-1])
    if parts[1] in _SPARSE_SDDMM:
        g, x = val(node.args[0]), val(node.args[1])
        return 2 * _hint(g.numel()) * _hint(x.shape[-1])
    return None


def _hint(v) -> int:
    return int(v) if isinstance(v, int) else int(getattr(v.node, "hint", 0) or 0)


def graph_flops(gm: fx.GraphModule, only=None, dense: bool = False) -> int:
    """FLOPs of the matmuls, convolutions and attention kernels in the graph (what flop_counter counts),
    or in the nodes of `only`. dense=True counts each sparsecc:: sparse GEMM as the dense GEMM it replaces
    (what training without sparse weights would cost)."""
    total = 0
    for node in gm.graph.nodes if only is None else only:
        if node.op != "call_function" or not hasattr(node.target, "overloadpacket"):
            continue
        if dense and (flops := dense_equivalent_flops(node)) is not None:
            total += flops
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
