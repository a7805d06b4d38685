"""Small FX helpers shared by the passes: naming parameters, building nodes with metadata, sizes."""
from __future__ import annotations

import contextlib
import re

import torch
import torch.fx as fx

from ._torch import compiling_frame, detect_fake_mode, source_name
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_map

aten = torch.ops.aten

_SOURCE_PART = re.compile(r"\['([^']*)'\]|\.(\w+)")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def fqn_from_source(source_name: str) -> str:
    """"L['self']._modules['fc1']._parameters['weight']" -> "fc1.weight" (the root local is dropped)."""
    parts = [a or b for a, b in _SOURCE_PART.findall(source_name)]
    return ".".join(p for p in parts[1:] if p not in _CONTAINERS)


def dynamo_parameters(gm: fx.GraphModule, example_inputs) -> dict[int, tuple[str, torch.Tensor]]:
    """Input index -> (parameter name, parameter) for the inputs of a Dynamo graph that are nn.Parameters."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        source = source_name(node)
        if isinstance(value, torch.nn.Parameter) and source is not None:
            found[i] = (fqn_from_source(source), value)
    return found


def dynamo_root_module(gm: fx.GraphModule) -> torch.nn.Module | None:
    """The module whose parameters the graph's parameter inputs were read from (the `self` of the compiled
    forward, or a global model), found in the frame Dynamo is compiling; None when there is no single one.
    With it, a scheme is checked against every parameter name, tied aliases included."""
    frame = compiling_frame()
    if frame is None:
        return None
    roots = set()
    for node in gm.graph.nodes:
        source = source_name(node) if node.op == "placeholder" else None
        if source is not None and "_parameters[" in source:
            roots.add(source.split("]", 1)[0] + "]")
    if len(roots) != 1:
        return None
    (root,) = roots
    scope = frame[0] if root.startswith("L[") else frame[1] if root.startswith("G[") else {}
    module = scope.get(root[3:-2])
    return module if isinstance(module, torch.nn.Module) else None


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy (node meta is copied shallowly, so fake values are shared, not duplicated)."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen   # how the flat inputs/outputs map to pytrees; never mutated
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    value, out_node = out
    graph.output(value, type_expr=getattr(out_node, "type", None))
    graph.output_node().meta = dict(out_node.meta)
    return fx.GraphModule(gm, graph)


def dynamo_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo graph that AOTAutograd still recognises as one (graph meta, parameter sources,
    each placeholder's source)."""
    new = clone_graph_module(gm)
    new.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, node in zip(gm.graph.find_nodes(op="placeholder"), new.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    return new


def val(arg):
    """The fake value of a node argument (a Node's meta['val'], anything else as is)."""
    return tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, arg)


def call(graph: fx.Graph, target, args, pass_name: str, kwargs=None) -> fx.Node:
    """Create call_function(target, args) with meta['val'] computed on fake tensors and provenance recorded."""
    kwargs = kwargs or {}
    node = graph.call_function(target, tuple(args), kwargs)
    fake_args, fake_kwargs = val(tuple(args)), val(kwargs)
    graph_vals = [n.meta.get("val") for n in graph.find_nodes(op="placeholder")]
    with detect_fake_mode(fake_args) or detect_fake_mode(graph_vals) or contextlib.nullcontext():
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    node.meta["sparsecc_pass"] = pass_name
    return node


def nbytes(value) -> int:
    """Bytes of a tensor (or of the tensors in a tuple); symbolic sizes are taken at their hint."""
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    numel = value.numel()
    if not isinstance(numel, int):
        numel = numel.node.hint if numel.node.has_hint() else 0
    return int(numel) * value.element_size()


def output_values(gm: fx.GraphModule) -> list:
    """The flat list of the graph's outputs (Nodes or None)."""
    return list(gm.graph.output_node().args[0])


def set_output_values(gm: fx.GraphModule, values: list) -> None:
    out = gm.graph.output_node()
    out.args = (type(out.args[0])(values),)


def backward_nodes(gm: fx.GraphModule, num_fwd_outputs: int) -> set[fx.Node]:
    """Nodes of a joint graph that the forward outputs do not need: the backward (and what only it uses)."""
    forward: set[fx.Node] = set()
    stack = [n for n in output_values(gm)[:num_fwd_outputs] if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in forward:
            forward.add(node)
            stack.extend(node.all_input_nodes)
    return {n for n in gm.graph.nodes if n not in forward and n.op != "output"}


def inline(gm: fx.GraphModule, fn, args: list[fx.Node], after: fx.Node, pass_name: str) -> list[fx.Node]:
    """Trace the eager function fn(*args) to aten ops and insert them after `after`; returns its outputs.

    This is how multi-node rewrites are written: as plain PyTorch, traced on the arguments' fake values."""
    fake_args = [a.meta["val"] for a in args]
    with detect_fake_mode(fake_args) or contextlib.nullcontext():
        traced = make_fx(fn)(*fake_args)
    env = dict(zip([n for n in traced.graph.nodes if n.op == "placeholder"], args))
    anchor = after
    for node in traced.graph.nodes:
        if node.op == "call_function":
            new_args = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, node.args)
            new_kwargs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, dict(node.kwargs))
            with gm.graph.inserting_after(anchor):
                env[node] = anchor = call(gm.graph, node.target, new_args, pass_name, new_kwargs)
        elif node.op == "output":
            return [env[o] for o in node.args[0]]
    raise AssertionError("traced function has no output")
