"""all_reduce_gradients: data-parallel training in one graph, communicating only what trains.

With a process group (compile_train_step(..., process_group=...)), every gradient the step keeps — after
prune_backward (frozen parameters have none) and subtensor_grads (a Channels weight's gradient is its k
channels) — is averaged over the group's ranks inside the graph, with PyTorch's traceable functional
collectives (_c10d_functional.all_reduce / wait_tensor), before fuse_optimizer consumes it. So each rank
sends exactly the trained elements: no frozen parameter, and k channels of a Channels weight.

Buckets: gradients are packed, in the order backward produces them, into flat buckets of at least
bucket_bytes (like DDP's bucket_cap_mb). A bucket's all_reduce is issued right after its last gradient exists
and waited for where the next bucket is issued (the last one at the end of backward), so one bucket's
communication overlaps the backward compute of the next. Every rank runs the same graph, so the collectives
are issued in the same order everywhere.

Exact: the average of the ranks' gradients of their local mean losses equals the gradient of the global
batch's mean loss when every rank has the same local batch size (as under DDP). BatchNorm statistics stay
per rank (as in DDP without SyncBatchNorm), so a model with batch statistics is not equal to single-process
training on the global batch.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .._torch import functional_collectives
from ..graph import call, nbytes, output_values, set_output_values
from . import PassResult, Plan
from .subtensor_grads import channel_part

aten = torch.ops.aten
NAME = "all_reduce_gradients"


def _buckets(values: list[fx.Node], order: dict, cap: int) -> list[list[fx.Node]]:
    """values in production order, cut into buckets of at least cap bytes (the last may be smaller)."""
    buckets, current, size = [], [], 0
    for v in sorted(values, key=order.__getitem__):
        current.append(v)
        size += nbytes(v.meta["val"])
        if size >= cap:
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])


def _issue(gm: fx.GraphModule, bucket: list[fx.Node], group: str) -> fx.Node:
    """all_reduce(cat(flattened gradients)), inserted right after the bucket's last gradient."""
    graph, anchor, flats = gm.graph, bucket[-1], []

    def add(target, args):
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = call(graph, target, args, NAME)
        return anchor
    for v in bucket:
        flats.append(add(aten.view.default, (v, [-1])))
    return add(functional_collectives()[0], (add(aten.cat.default, (flats,)), "sum", group))


def _unpack(gm: fx.GraphModule, issued: fx.Node, bucket: list[fx.Node], where: fx.Node, world: int) -> dict:
    """wait(issued) / world before `where`, split back into the bucket's gradients: {gradient: averaged}."""
    graph = gm.graph
    out, offset = {}, 0
    with graph.inserting_before(where):
        waited = call(graph, functional_collectives()[1], (issued,), NAME)
        mean = call(graph, aten.div.Tensor, (waited, world), NAME)
        for v in bucket:
            shape = list(v.meta["val"].shape)
            numel = v.meta["val"].numel()
            part = call(graph, aten.slice.Tensor, (mean, 0, offset, offset + numel), NAME)
            out[v] = call(graph, aten.view.default, (part, shape), NAME)
            offset += numel
    return out


def all_reduce_gradients(gm: fx.GraphModule, plan: Plan) -> PassResult:
    result = PassResult(NAME)
    if plan.comm is None:
        return result
    group, world, cap = plan.comm
    outs = output_values(gm)
    travelling = {}                                   # gradient output node -> the node whose value is reduced
    for p in plan.params:
        grad = outs[plan.grad_position(p)]
        if grad is not None:
            part = channel_part(grad, p)             # a sliced Channels gradient sends its k channels
            travelling[grad] = grad if part is None else part[0]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    buckets = _buckets(list(dict.fromkeys(travelling.values())), order, cap)
    issued = [_issue(gm, b, group) for b in buckets]
    output = next(iter(gm.graph.find_nodes(op="output")))
    averaged = {}
    for i, (bucket, node) in enumerate(zip(buckets, issued)):
        where = issued[i + 1] if i + 1 < len(issued) else output     # wait where the next bucket is issued
        averaged.update(_unpack(gm, node, bucket, where, world))
    new_outs = list(outs)
    for pos, grad in enumerate(outs):
        if grad in travelling:
            value = travelling[grad]
            if value is grad:
                new_outs[pos] = averaged[value]
            else:                                     # the Channels gradient pads / scatters the averaged part
                grad.replace_input_with(value, averaged[value])
                averaged[value].append(grad)          # after the wait: its other inputs come earlier
    set_output_values(gm, new_outs)
    sent = sum(nbytes(b.meta["val"]) for b in (n.args[0] for n in issued))
    result.counts.update(buckets=len(buckets), bytes_all_reduced=sent)
    result.notes.append(f"gradients averaged over {world} ranks in {len(buckets)} bucket(s): {sent:,} bytes per "
                        f"step, the trained elements only")
    return result

