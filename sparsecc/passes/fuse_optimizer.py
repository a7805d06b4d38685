"""fuse_optimizer: put each trained tensor's optimizer update right after its gradient is produced.

Each gradient output of the joint graph is consumed by the optimizer's own update function, traced into
the graph, and the new parameter and state are written in place (copy_ / index_put_) right after the last
node that reads the old value, so neither the gradient nor the new value outlives its update. The graph
then returns only the forward outputs. For a Channels rule the update reads the k-channel gradient from
before subtensor_grads padded it, so no full-size gradient exists and the optimizer state has the size
of the trained slice. Learning rate and step count are graph inputs (0-d tensors), so a schedule never
recompiles. Adds placeholders: lr, step, then each update's state in plan order.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from ..config import Channels
from ..graph import call, inline, output_values, set_output_values
from ..memory import aliases_input
from . import ParamPlan, PassResult, Plan
from .dce import eliminate_dead_code
from .subtensor_grads import channel_selection

aten = torch.ops.aten
NAME = "fuse_optimizer"


def _new_input(gm: fx.GraphModule, name: str, like: torch.Tensor, shape) -> fx.Node:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    with like.fake_mode:
        node.meta["val"] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return node


def _trained_part(gm: fx.GraphModule, grad: fx.Node, param: fx.Node, p: ParamPlan) -> tuple[fx.Node, fx.Node]:
    """(gradient, parameter) of what is trained: the k-channel slice for a Channels rule, else the whole tensor."""
    if not isinstance(p.rule, Channels) or grad.meta.get("sparsecc_pass") != "subtensor_grads":
        return grad, param
    axis = p.rule.axis
    if grad.target is aten.constant_pad_nd.default:          # pad(part): the first k channels
        part, index = grad.args[0], None
    else:                                                     # index_put(zeros, [.., index], part)
        part, index = grad.args[2], grad.args[1][axis]
    target, args = channel_selection(param, axis, part.meta["val"].shape[axis], index)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    after = max([part] + [a for a in tree_leaves(args) if isinstance(a, fx.Node)], key=order.__getitem__)
    with gm.graph.inserting_after(after):
        return part, call(gm.graph, target, args, NAME)


def fuse_optimizer(gm: fx.GraphModule, plan: Plan) -> PassResult:
    result = PassResult(NAME)
    opt = plan.optimizer
    outs = output_values(gm)
    primals = [n for n in gm.graph.nodes if n.op == "placeholder"]
    scalar = primals[0].meta["val"].new_empty(())
    lr = _new_input(gm, "lr", scalar, ())
    step = _new_input(gm, "step", scalar, ())
    updates = []
    for p in plan.params:
        grad = outs[plan.grad_position(p)]
        if grad is None:
            continue
        g, w = _trained_part(gm, grad, primals[p.index], p)
        shape = tuple(g.meta["val"].shape)
        state = [_new_input(gm, f"{name}_{p.name.replace('.', '_')}", g.meta["val"], shape) for name in opt.state_names]
        new_p, *new_state = inline(gm, lambda *args: opt.update(*args), [w, g, lr, step, *state],
                                   after=w if w.op != "placeholder" else g, pass_name=NAME)
        _write_back(gm, primals[p.index], w, new_p)
        for old, new in zip(state, new_state):
            _write_back(gm, old, old, new)
        updates.append((p.name, shape))
        result.notes.append(f"{p.name}: {type(opt).__name__} update of {list(shape)} right after its gradient, in place")
    set_output_values(gm, outs[:plan.num_fwd_outputs])
    gm.meta["sparsecc_updates"] = updates
    result.counts["updates_fused"] = len(updates)
    result.counts["nodes_removed"] = eliminate_dead_code(gm)
    return result


def _readers(root: fx.Node) -> set[fx.Node]:
    """Every node that reads root's storage, directly or through views of it."""
    seen, stack = set(), [root]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                if aliases_input(user):
                    stack.append(user)
    return seen


def _write_back(gm: fx.GraphModule, root: fx.Node, dest: fx.Node, value: fx.Node) -> None:
    """Write value into dest (root itself, a slice view of it, or an index copy of it) in place, placed
    after the last node that reads root, so nothing sees the updated value too early."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    after = max([value, *_readers(root)], key=order.__getitem__)
    with gm.graph.inserting_after(after):
        if dest.target is aten.index.Tensor:               # the magnitude-selected channels
            call(gm.graph, aten.index_put_.default, (root, dest.args[1], value), NAME)
        else:                                               # the whole tensor, or its first-k slice view
            call(gm.graph, aten.copy_.default, (dest, value), NAME)
