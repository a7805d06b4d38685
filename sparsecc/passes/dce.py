"""Dead-code elimination that also narrows the output_mask of multi-output backward ops
(convolution_backward, native_*_norm_backward), so an unused gradient is never computed."""
from __future__ import annotations

import operator

import torch.fx as fx


def _mask_position(target) -> int | None:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    names = [a.name for a in schema.arguments]
    return names.index("output_mask") if "output_mask" in names else None


def _narrow_output_masks(graph: fx.Graph) -> int:
    narrowed = 0
    for node in graph.nodes:
        pos = _mask_position(node.target) if node.op == "call_function" else None
        if pos is None or pos >= len(node.args):
            continue
        used = {u.args[1] for u in node.users if u.target is operator.getitem and u.users}
        mask = list(node.args[pos])
        new_mask = [bool(m) and i in used for i, m in enumerate(mask)]
        if new_mask != mask and any(new_mask):
            node.args = node.args[:pos] + (new_mask,) + node.args[pos + 1:]
            narrowed += 1
    return narrowed


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Remove unused nodes until nothing changes; returns how many nodes were removed."""
    before = len(gm.graph.nodes)
    while True:
        changed = gm.graph.eliminate_dead_code()
        if not _narrow_output_masks(gm.graph) and not changed:
            break
    gm.recompile()
    return before - len(gm.graph.nodes)
