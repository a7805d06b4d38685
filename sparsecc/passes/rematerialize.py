"""rematerialize: choose, like the min-cut partitioner of torch.compile, which forward tensors the backward
keeps and which it recomputes, for a training step that stays one graph.

The exported step seeds its backward with a constant 1; that constant becomes a tangent input, AOTAutograd's
min_cut_rematerialization_partition splits the graph into forward and backward (saving the cheapest cut
and recomputing cheap elementwise chains), and the two halves are stitched back into one graph with the
seed restored. Kept only if the liveness model's peak does not rise. Under memory_budget's search (an
activation_memory_budget below 1) on a step whose inputs outweigh what its backward keeps (a sparse update: the
inputs are every weight of the model), the partitioner would ignore the budget: the inputs are hidden from it, and
the result is kept for the search to judge by the executor's own memory model.
"""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx
from functorch.compile import min_cut_rematerialization_partition

from .._torch import functorch_config
from ..graph import clone_graph_module, nbytes, output_values
from ..memory import liveness
from . import PassResult, Plan

aten = torch.ops.aten


def _backward_seed(gm: fx.GraphModule, num_fwd_outputs: int) -> fx.Node | None:
    """The constant 1 that export's joint graph starts the backward from (d loss / d loss): the first scalar
    full(1) after the loss (a model's own loss code may create such constants too)."""
    loss = output_values(gm)[num_fwd_outputs - 1]
    after = itertools.dropwhile(lambda n: n is not loss, gm.graph.nodes)
    return next((n for n in after if n.target is aten.full.default and n.args[:2] == ([], 1)), None)


def _inputs_as_constants(joint: fx.GraphModule) -> None:
    """The inputs of joint, but the tangent and the smallest one (the forward keeps an input), read through
    get_attr instead (a buffer holding its fake value; _copy maps it back to the input). Under an
    activation_memory_budget the min-cut partitioner measures the budget between the size of the graph's inputs
    (what it saves at least) and of what it saves by default, and keeps the default when the inputs are the
    larger: for a whole training step the inputs are every parameter of the model, so without this the budget
    would never recompute anything."""
    inputs = [ph for ph in joint.graph.find_nodes(op="placeholder") if ph.name != "tangents_1"]
    smallest = min(inputs, key=lambda ph: nbytes(ph.meta.get("val")), default=None)
    for ph in inputs:
        if ph is smallest:
            continue
        joint.register_buffer(_CONSTANT + ph.name, ph.meta["val"])
        with joint.graph.inserting_before(ph):
            attr = joint.graph.get_attr(_CONSTANT + ph.name)
        attr.meta = dict(ph.meta)
        ph.replace_all_uses_with(attr)
        joint.graph.erase_node(ph)
    joint.recompile()


_CONSTANT = "_sparsecc_input_"


def _stitch(gm: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule, seed: fx.Node, num_fwd: int) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        env[ph.name] = env[_CONSTANT + ph.name] = graph.placeholder(ph.name)
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
        elif node.op == "get_attr" and node.target.startswith(_CONSTANT):     # an input (_inputs_as_constants)
            local[node] = env[node.target]
        elif node.op == "output":
            return [local[o] if isinstance(o, fx.Node) else o for o in node.args[0]]
        else:
            local[node] = env[node.name] = graph.node_copy(node, lambda n: local[n])
    raise AssertionError("graph without output")


def _partition(joint: fx.GraphModule, num_fwd: int):
    return min_cut_rematerialization_partition(joint, None, compiler="inductor", num_fwd_outputs=num_fwd)


def _budget_blind(joint: fx.GraphModule, num_fwd: int) -> bool:
    """Whether memory_budget's search is on (an activation_memory_budget below 1) and the partitioner would ignore
    it: what the backward keeps by default is no larger than the graph's inputs (see _inputs_as_constants)."""
    if functorch_config.activation_memory_budget >= 1:
        return False
    with functorch_config.patch(activation_memory_budget=1.0):
        fw, _ = _partition(clone_graph_module(joint), num_fwd)
    kept = sum(nbytes(v.meta.get("val")) for v in output_values(fw)[num_fwd:] if isinstance(v, fx.Node))
    inputs = sum(nbytes(ph.meta.get("val")) for ph in joint.graph.find_nodes(op="placeholder")
                 if ph.name != "tangents_1")
    return kept <= inputs


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
    for check in joint.graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default):
        joint.graph.erase_node(check)   # a trace's dtype check of a cast, no value: torch 2.11's min-cut cannot size it
    hidden = _budget_blind(joint, plan.num_fwd_outputs)
    if hidden:
        _inputs_as_constants(joint)
    fw, bw = _partition(joint, plan.num_fwd_outputs)
    saved = len(output_values(fw)) - plan.num_fwd_outputs
    stitched = fx.GraphModule(gm, _stitch(gm, fw, bw, seed, plan.num_fwd_outputs))
    after = liveness(stitched).peak
    kept = after <= before or hidden        # memory_budget's search judges that graph by the executor's own model
    result.counts.update(saved_tensors=saved, peak_bytes_before=before, peak_bytes_after=after if kept else before)
    if kept:
        gm.graph = stitched.graph
        gm.recompile()
        result.notes.append(f"backward keeps {saved} forward tensors, recomputes the rest; peak {before:,} -> {after:,}")
    else:
        result.notes.append(f"kept the graph as it was (peak {before:,}; partitioned {after:,})")
    return result
