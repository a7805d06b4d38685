"""fuse_optimizer: put each trained tensor's optimizer update right after its gradient is produced.

Each gradient output of the joint graph is consumed by the optimizer's own update function, traced into
the graph, and the new parameter and state are written in place (copy_ / index_put_) right after the last
node that reads the old value, so neither the gradient nor the new value outlives its update. The graph
then returns only the forward outputs. For a Channels rule the update reads the k-channel gradient from
before subtensor_grads padded it, so no full-size gradient exists and the optimizer state has the size
of the trained slice. Learning rate and step count are graph inputs (0-d tensors), so a schedule never
recompiles. Adds placeholders: lr, step, then each update's state in plan order.

On the Triton path (the parameter on CUDA, or SPARSECC_TRITON=1) the update of a Channels rule's trained channels
is one sparsecc::sgd_rows / sparsecc::adamw_rows call, whose generated kernel updates them where they lie in the
parameter and state (channels of dim 0, or of dim 1 of a matrix); on the CPU path the graph stays pure aten.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from ..graph import call, inline, output_values, set_output_values
from ..memory import aliases_input
from ..ops.channels import on_triton
from ..optim import SGD
from . import PassResult, Plan
from .dce import eliminate_dead_code
from .subtensor_grads import channel_part, channel_selection

aten = torch.ops.aten
NAME = "fuse_optimizer"


def _new_input(gm: fx.GraphModule, name: str, like: torch.Tensor, shape) -> fx.Node:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    with like.fake_mode:
        node.meta["val"] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return node


def _select(gm: fx.GraphModule, param: fx.Node, axis: int, part: fx.Node, index: fx.Node | None) -> fx.Node:
    """The trained channels of param: a slice view of the first k, or a copy at the index."""
    target, args = channel_selection(param, axis, part.meta["val"].shape[axis], index)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    after = max([part] + [a for a in tree_leaves(args) if isinstance(a, fx.Node)], key=order.__getitem__)
    with gm.graph.inserting_after(after):
        return call(gm.graph, target, args, NAME)


def _rows_kernel(opt, param: fx.Node, g: fx.Node, index: fx.Node | None, axis: int, lr: fx.Node, step: fx.Node,
                 state: list[fx.Node]) -> tuple:
    """(op, args) of the generated row update of the trained channels."""
    head = (param, g, index, g.meta["val"].shape[axis], axis)
    if isinstance(opt, SGD):
        return torch.ops.sparsecc.sgd_rows.default, (*head, *(state or [None]), lr, float(opt.momentum),
                                                     float(opt.weight_decay), opt.nesterov)
    return torch.ops.sparsecc.adamw_rows.default, (*head, *state, lr, step, *map(float, opt.betas), float(opt.eps),
                                                   float(opt.weight_decay))


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
        param, part = primals[p.index], channel_part(grad, p)
        g = grad if part is None else part[0]
        shape = tuple(g.meta["val"].shape)
        state = [_new_input(gm, f"{name}_{p.name.replace('.', '_')}", g.meta["val"], shape) for name in opt.state_names]
        if part is not None and on_triton(param.meta["val"]) and (p.rule.axis == 0 or len(p.shape) == 2):
            target, args = _rows_kernel(opt, param, g, part[1], p.rule.axis, lr, step, state)
            with gm.graph.inserting_after(_last_reader(gm, param, g)):
                call(gm.graph, target, args, NAME)
            how = f"sparsecc::{target._opname} (generated kernel)"
        else:
            w = param if part is None else _select(gm, param, p.rule.axis, *part)
            new_p, *new_state = inline(gm, lambda *args: opt.update(*args), [w, g, lr, step, *state],
                                       after=w if w.op != "placeholder" else g, pass_name=NAME)
            _write_back(gm, param, w, new_p)
            for old, new in zip(state, new_state):
                _write_back(gm, old, old, new)
            how = f"{type(opt).__name__} update"
        updates.append((p.name, shape))
        result.notes.append(f"{p.name}: {how} of {list(shape)} right after its gradient, in place")
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


def _last_reader(gm: fx.GraphModule, root: fx.Node, value: fx.Node) -> fx.Node:
    """The later of value and the last node that reads root: where an in-place write of root goes."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return max([value, *_readers(root)], key=order.__getitem__)


def _write_back(gm: fx.GraphModule, root: fx.Node, dest: fx.Node, value: fx.Node) -> None:
    """Write value into dest (root itself, a slice view of it, or an index copy of it) in place, placed
    after the last node that reads root, so nothing sees the updated value too early."""
    with gm.graph.inserting_after(_last_reader(gm, root, value)):
        if dest.target is aten.index.Tensor:               # the magnitude-selected channels
            call(gm.graph, aten.index_put_.default, (root, dest.args[1], value), NAME)
        else:                                               # the whole tensor, or its first-k slice view
            call(gm.graph, aten.copy_.default, (dest, value), NAME)
