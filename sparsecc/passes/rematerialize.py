"""rematerialize: choose, like the min-cut partitioner of torch.compile, which forward tensors the backward
keeps and which it recomputes, for a training step that stays one graph.

The exported step seeds its backward with a constant 1; that constant becomes a tangent input, AOTAutograd's
min_cut_rematerialization_partition splits the graph into forward and backward (saving the cheapest cut
and recomputing cheap elementwise chains), and the two halves are stitched back into one graph with the
seed restored. Kept only if the liveness model's peak does not rise.
"""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx
from functorch.compile import min_cut_rematerialization_partition

from ..graph import clone_graph_module, output_values
from ..memory import liveness
from . import PassResult, Plan

aten = torch.ops.aten


def _backward_seed(gm: fx.GraphModule, num_fwd_outputs: int) -> fx.Node | None:
    """The constant 1 that export's joint graph starts the backward from (d loss / d loss): the first scalar
    full(1) after the loss (a model's own loss code may create such constants too)."""
    loss = output_values(gm)[num_fwd_outputs - 1]
    after = itertools.dropwhile(lambda n: n is not loss, gm.graph.nodes)
    return next((n for n in after if n.target is aten.full.default and n.args[:2] == ([], 1)), None)


def _stitch(joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule, seed: fx.Node, num_fwd: int) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for ph in joint.graph.find_nodes(op="placeholder"):
        if ph.name != "tangents_1":
            env[ph.name] = graph.placeholder(ph.name)
            env[ph.name].meta = dict(ph.meta)
    fw_outs = _copy(graph, fw, env)
    env["tangents_1"] = graph.call_function(seed.target, seed.args, seed.kwargs)
    env["tangents_1"].meta = dict(seed.meta)
    grads = _copy(graph, bw, env)
    graph.output(tuple(fw_outs[:num_fwd]) + tuple(grads))
    return graph


def _copy(graph: fx.Graph, part: fx.GraphModule, env: dict[str, fx.Node]) -> list:
    """Append part's nodes to graph, its inputs looked up by name in env (every node is added to env)."""
    local: dict[fx.Node, fx.Node] = {}
    for node in part.graph.nodes:
        if node.op == "placeholder":
            local[node] = env[node.name]
        elif node.op == "output":
            return [local[o] if isinstance(o, fx.Node) else o for o in node.args[0]]
        else:
            local[node] = env[node.name] = graph.node_copy(node, lambda n: local[n])
    raise AssertionError("graph without output")


def rematerialize(gm: fx.GraphModule, plan: Plan) -> PassResult:
    result = PassResult("rematerialize")
    seed = _backward_seed(gm, plan.num_fwd_outputs)
    if seed is None:
        result.notes.append("no backward seed found; graph left as it was")
        return result
    before = liveness(gm).peak
    joint = clone_graph_module(gm)
    joint_seed = _backward_seed(joint, plan.num_fwd_outputs)
    last = joint.graph.find_nodes(op="placeholder")[-1]
    with joint.graph.inserting_after(last):
        tangent = joint.graph.placeholder("tangents_1")
    tangent.meta = dict(joint_seed.meta)
    joint_seed.replace_all_uses_with(tangent)
    joint.graph.erase_node(joint_seed)
    fw, bw = min_cut_rematerialization_partition(joint, None, compiler="inductor", num_fwd_outputs=plan.num_fwd_outputs)
    saved = len(output_values(fw)) - plan.num_fwd_outputs
    stitched = fx.GraphModule(gm, _stitch(joint, fw, bw, seed, plan.num_fwd_outputs))
    after = liveness(stitched).peak
    result.counts.update(saved_tensors=saved, peak_bytes_before=before, peak_bytes_after=min(before, after))
    if after <= before:
        gm.graph = stitched.graph
        gm.recompile()
        result.notes.append(f"backward keeps {saved} forward tensors, recomputes the rest; peak {before:,} -> {after:,}")
    else:
        result.notes.append(f"kept the graph as it was (peak {before:,}; partitioned {after:,})")
    return result
