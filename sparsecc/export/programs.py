"""The two functions an artifact carries, as pure functional torch.export programs.

`train_step`: the graph a TrainStep runs (pruned backward, sliced gradients, fused optimizer) made
functional: every tensor it reads is an input — parameters, buffers, batch, lr, step, optimizer state and
the graph's index constants — and every tensor it writes in place becomes an output. `forward`: the model
in eval mode with its parameters and buffers as inputs. Each input and output carries a key
("param/fc1.weight", "state/fc1.weight/exp_avg", "input/0", "lr", "loss", ...) that the manifest records
and the runner feeds by. Programs hold no tensors of their own, so their serialized form is JSON alone.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import operator
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_flatten, treespec_dumps

from .. import ops  # noqa: F401  (registers the sparsecc:: ops SPARSE_KERNELS names)
from .._torch import program_json, serde
from ..errors import ConfigError
from . import layouts
from ..calling import MASK_PREFIX, Structure, call_model, first_alias, flatten

aten = torch.ops.aten
LR, STEP, LOSS = "lr", "step", "loss"
# the sparsecc:: ops a host program may call: the sparse weights' kernels (C++ on the CPU; registered by sparsecc
# itself, so a program calling them runs no code of its own). IREE programs read sparse weights densely.
SPARSE_KERNELS = frozenset(getattr(torch.ops.sparsecc, name).default for name in (
    "block_sparse_mm", "block_sparse_mm_t", "block_sddmm", "csr_mm", "csr_mm_t", "csr_sddmm", "nm_mm", "nm_mm_t",
    "nm_sddmm"))


@dataclass
class Program:
    name: str
    exported: torch.export.ExportedProgram
    inputs: list[str]        # key of each positional input
    outputs: list[str]       # key of each output
    example: list[torch.Tensor]
    out_spec: str = ""       # JSON pytree spec of a forward's user outputs
    out_tensors: tuple[bool, ...] = ()   # which of its leaves are tensors (program outputs); the rest are None

    def signature(self) -> dict:
        def entry(key, t):
            return {"key": key, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        out_vals = [n.meta["val"] for n in self.exported.graph.output_node().args[0]]
        return {"inputs": [entry(k, t) for k, t in zip(self.inputs, self.example)],
                "outputs": [entry(k, t) for k, t in zip(self.outputs, out_vals)],
                "out_spec": self.out_spec, "out_tensors": list(self.out_tensors)}


class _Call(torch.nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.__dict__["gm"] = gm     # not a submodule: export must not lift its (unused) tensor attributes

    def forward(self, *args):
        return tuple(self.gm(*args))


def _reshape_not_view(gm: fx.GraphModule) -> None:
    """aten.view -> aten.reshape in a graph with no in-place writes: the same values, and a later re-trace
    (torch-mlir decomposes again) may assign an op other strides than the trace that chose `view` saw."""
    for node in gm.graph.find_nodes(op="call_function", target=aten.view.default):
        node.target = aten.reshape.default
    gm.recompile()


@contextlib.contextmanager
def leafspec_warning_ignored():
    """Around ExportedProgram.run_decompositions (ours, or torch-mlir's inside fx.export_and_import): it deep-copies
    the program's module call graph, whose pytree specs hold LeafSpec objects; copying one re-creates a LeafSpec,
    a class PyTorch 2.13 itself deprecates, so every export would print "FutureWarning: isinstance(treespec,
    LeafSpec) is deprecated". The copy is inside PyTorch and nothing sparsecc passes avoids it: exactly that
    warning is ignored, and only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        yield


def _export(module: torch.nn.Module, args: tuple, functional: bool = False) -> torch.export.ExportedProgram:
    """torch.export (non-strict) decomposed to core ATen. functional=True: module is a graph of core ATen ops
    with no in-place writes, whose export is already that (decomposing it again retraces it for nothing)."""
    ep = torch.export.export(module, args, strict=False)
    if functional:           # as a retrace would: no unused results of multi-result ops (batch norm's statistics)
        for node in ep.graph.find_nodes(op="call_function", target=operator.getitem):
            if not node.users:
                ep.graph.erase_node(node)
        ep.graph_module.recompile()
        return ep
    with leafspec_warning_ignored():
        return ep.run_decompositions({})


def _functional(module: torch.nn.Module, args: list[torch.Tensor]):
    """Export module(*args) as a program with no in-place writes. Returns (program, {output index: input index}
    for the outputs that carry the new value of an input the original wrote in place, the tensors the trace
    created itself — e.g. a torch.tensor(...) in a model's forward — which the program takes after args)."""
    ep = _export(module, tuple(args))
    specs = ep.graph_signature.input_specs
    nodes = ep.graph.find_nodes(op="placeholder")
    user = [n for n, sp in zip(nodes, specs) if sp.kind == InputKind.USER_INPUT]
    own = [(n, ep.constants[sp.target] if sp.target in ep.constants else ep.state_dict[sp.target])
           for n, sp in zip(nodes, specs) if sp.kind != InputKind.USER_INPUT]
    written = {out: next(i for i, n in enumerate(user) if n.name == name)
               for out, name in ep.graph_signature.user_inputs_to_mutate.items()}
    outputs = [n.name for n in ep.graph.output_node().args[0]]
    new_of = {i: written[name] for i, name in enumerate(outputs) if name in written}
    flat = fx.GraphModule(ep.graph_module, ep.graph_module.graph)
    flat.graph._codegen = fx.graph.CodeGen()       # plain positional inputs, a plain tuple out
    for node, _ in own:                            # the trace's own tensors become trailing inputs
        user[-1].append(node)
        user.append(node)
    _reshape_not_view(flat)
    lifted = [t.detach().clone() for _, t in own]
    pure = _export(_Call(flat), tuple(args) + tuple(lifted), functional=True)
    _reshape_not_view(pure.graph_module)
    return pure, new_of, lifted


def _lift_constants(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Turn the graph's own tensors — tensor attributes (get_attr) and sparsecc::index_constant nodes — into
    trailing inputs, so the program holds none; returns them in input order."""
    constants = []
    last = gm.graph.find_nodes(op="placeholder")[-1]
    index_op = torch.ops.sparsecc.index_constant.default
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is index_op:
            values, device = node.args
            value = torch.tensor(values, dtype=torch.int64, device=device)
        elif node.op == "get_attr" and isinstance(getattr(gm, node.target, None), torch.Tensor):
            value = getattr(gm, node.target).detach().clone()
        else:
            continue
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(f"constant_{len(constants)}")
        last.meta = dict(node.meta)
        node.replace_all_uses_with(last)
        gm.graph.erase_node(node)
        constants.append(value)
    gm.recompile()
    return constants


def _densify(graph: fx.Graph, values: fx.Node, index: fx.Node, like: torch.Tensor) -> fx.Node:
    """zeros(like).flatten().index_put([index], values).view(like.shape): a dense tensor from a stored one."""
    zeros = graph.call_function(aten.full.default, ([like.numel()], 0),
                                {"dtype": like.dtype, "device": like.device})
    flat = graph.call_function(aten.index_put.default, (zeros, [index], values))
    return graph.call_function(aten.view.default, (flat, list(like.shape)))


def _compress(gm: fx.GraphModule, keys: list[str], args: list[torch.Tensor], sparse: dict[str, torch.Tensor],
              masks: dict[str, str], trained: set[str]) -> tuple[list[str], list[torch.Tensor], list[str]]:
    """Give each sparse weight's dense inputs (the weight, its full-shape optimizer state, its mask) to the
    program as its kept values plus one int64 flat index, and return the new values of the written ones
    as extra outputs. Returns (input keys, example inputs, extra output keys)."""
    graph = gm.graph
    nodes = dict(zip(keys, graph.find_nodes(op="placeholder")))
    example = dict(zip(keys, args))
    last, body = list(nodes.values())[-1], list(nodes.values())[-1].next
    written, fresh = [], itertools.count()
    for name, flat in sparse.items():
        with graph.inserting_after(last):
            index = last = graph.placeholder(f"sparse_index_{next(fresh)}")
        nodes[f"index/{name}"], example[f"index/{name}"] = index, flat
        shape = example[f"param/{name}"].shape
        dense = [f"param/{name}"] + [k for k in keys if k.startswith(f"state/{name}/") and example[k].shape == shape]
        mask = [f"buffer/{masks[name]}"] if f"buffer/{masks.get(name)}" in nodes else []   # gone when unread
        for key in dense + mask:
            old, like = nodes.pop(key), example.pop(key)
            if key in dense:
                with graph.inserting_after(last):
                    values = last = graph.placeholder(f"sparse_values_{next(fresh)}")
                nodes[key], example[key] = values, like.reshape(-1)[flat]
            with graph.inserting_before(body):
                if key not in dense:        # the mask: ones at the kept entries
                    values = graph.call_function(aten.full.default, ([flat.numel()], 1),
                                                 {"dtype": like.dtype, "device": like.device})
                full = _densify(graph, values, index, like)
            old.replace_all_uses_with(full)
            graph.erase_node(old)
            if key in dense and name in trained:
                written.append((key, full, index))
    out = graph.output_node()
    with graph.inserting_before(out):
        news = [graph.call_function(aten.index.Tensor, (graph.call_function(aten.view.default, (full, [-1])), [index]))
                for _, full, index in written]
    out.args = (tuple(out.args[0]) + tuple(news),)
    gm.recompile()
    order = {n: k for k, n in nodes.items()}
    keys = [order[n] for n in graph.find_nodes(op="placeholder")]
    return keys, [example[k] for k in keys], [k for k, _, _ in written]


def train_step_program(step, x, y, sparse: dict[str, torch.Tensor] | None = None, *,
                       sparse_kernels: bool = False) -> Program:
    """The functional training step of `step` for batches shaped like (x, y); its example inputs are the
    step's current tensors, index constants included. `sparse` maps sparse weights to the int64 flat
    positions of their kept entries: those weights travel compressed (see _compress). sparse_kernels=True
    (the host program): the sparse weights' linears run on the SPARSE_KERNELS where the step's cost model
    chose them; their operands are inputs keyed "kernel/<weight>/<operand>" (layouts.kernel_operands rebuilds
    them from the stored index), and the program's constants are keyed "constant/host/i"."""
    gm, leaves = step.portable_graph(x, y, sparse_kernels=sparse_kernels)
    updates = gm.meta["sparsecc_updates"]
    constants = _lift_constants(gm)
    kernels = {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target not in SPARSE_KERNELS
               and getattr(n.target, "namespace", "aten") not in ("aten", "prims")}
    if kernels:
        raise ConfigError(f"the step's graph calls {sorted(kernels)} (generated GPU kernels: CUDA parameters or "
                          f"SPARSECC_TRITON=1), which no artifact runtime has; save from a CPU step without "
                          f"SPARSECC_TRITON")
    io = gm.meta["sparsecc_io"]
    keys = [f"param/{n}" for n in io.params]
    keys += [f"kernel/{'/'.join(io.operands[n])}" if n in io.operands else f"buffer/{n}" for n in io.buffers]
    keys += [f"input/{i}" for i in range(len(leaves))] + [LR, STEP]
    keys += [f"state/{n}/{s}" for n, _ in updates for s in step.optimizer.state_names]
    constant = "constant/host/" if sparse_kernels else "constant/"
    keys += [f"{constant}{i}" for i in range(len(constants))]
    args = [t.detach().clone() for t in step._inputs(io, leaves, updates)] + constants
    masks = {n: f"{MASK_PREFIX}{i}" for i, n in enumerate(step.masks)}
    keys, args, extra = _compress(gm, keys, args, sparse or {}, masks, {n for n, _ in updates})
    exported, new_of, lifted = _functional(_Call(gm), args)
    keys += [f"{constant}{len(constants) + i}" for i in range(len(lifted))]
    args += lifted
    user = [f"buffer/{n}" for n in io.mutated] + [LOSS] + extra
    outputs, k = [], 0
    for i in range(len(exported.graph.output_node().args[0])):
        if i in new_of:
            outputs.append(keys[new_of[i]])
        else:
            outputs.append(user[k])
            k += 1
    return Program("train_step", exported, keys, outputs, args)


def _plain(out):
    """A model output as plain containers: mappings (transformers' ModelOutput too) become dicts, tuples and
    lists stay, tensors stay, anything else (a KV cache object) becomes None — so the loaded forward returns
    it without the model's classes. Only the tensor leaves are program outputs."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return {k: _plain(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_plain(v) for v in out) if type(out) in (tuple, list) else tuple(_plain(v) for v in out)
    return None


class _Forward(torch.nn.Module):
    def __init__(self, model, names, aliases, structure: Structure, shapes):
        super().__init__()
        self.__dict__["model"] = model    # not a submodule: its tensors are this program's inputs, not its own
        self.names, self.aliases, self.structure, self.shapes = names, aliases, structure, shapes

    def forward(self, *args):
        tensors = dict(zip(self.names, args))
        for name, shape in self.shapes.items():      # sparse weights: values + flat index
            values, index = tensors.pop(name), tensors.pop(f"index/{name}")
            tensors[name] = layouts.densify(values, index, shape)
        tensors.update({alias: tensors[first] for alias, first in self.aliases.items()})
        x = self.structure.unflatten(args[len(self.names):])
        out = call_model(self.model, x, tensors, tie_weights=False, strict=False)
        return tuple(leaf for leaf in tree_flatten(_plain(out))[0] if isinstance(leaf, torch.Tensor))


def first_names(step) -> dict[str, str]:
    """Each parameter name of step -> the first name of its tensor (itself unless the tensor is tied)."""
    names = list(step.params)
    return {n: names[i] for n, i in zip(names, first_alias(names, step.params))}


def forward_program(step, x, sparse: dict[str, torch.Tensor] | None = None) -> Program:
    """The model's forward in eval mode, parameters and buffers as inputs (sparse weights as values and
    flat index, as in train_step_program)."""
    sparse = sparse or {}
    model = step.model
    params = dict(model.named_parameters())                    # first name of each tied tensor
    aliases = {n: first for n, first in first_names(step).items() if n != first}
    buffers = dict(model.named_buffers())
    leaves, structure = flatten(x)
    names = list(params) + list(buffers) + [f"index/{n}" for n in sparse]
    tensors = [p.detach().reshape(-1)[sparse[n]] if n in sparse else p.detach() for n, p in params.items()]
    args = [t.clone() for t in [*tensors, *buffers.values(), *sparse.values(), *leaves]]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            leaves_out, out_spec = tree_flatten(_plain(call_model(model, x)))
            exported, new_of, lifted = _functional(_Forward(model, names, aliases, structure,
                                                            {n: params[n].shape for n in sparse}), args)
    finally:
        model.train(training)
    assert not new_of, "an eval-mode forward writes no input"
    keys = [f"param/{n}" for n in params] + [f"buffer/{n}" for n in buffers] + [f"index/{n}" for n in sparse]
    keys += [f"input/{i}" for i in range(len(leaves))] + [f"constant/forward/{i}" for i in range(len(lifted))]
    n_out = len(exported.graph.output_node().args[0])
    return Program("forward", exported, keys, [f"output/{i}" for i in range(n_out)], args + lifted,
                   treespec_dumps(out_spec),
                   tuple(isinstance(leaf, torch.Tensor) for leaf in leaves_out))


# ---- host serialization: JSON only --------------------------------------------------------------------

_DEBUG_META = ("stack_trace", "from_node", "nn_module_stack", "torch_fn", "source_fn_stack")


def dumps(program: Program) -> bytes:
    """The program's graph as torch.export's JSON schema, without per-node debug metadata (source lines,
    module stacks: over half the bytes). It holds no tensors (every tensor is an input): torch.export's pickled
    sections are not written (torch 2.11: not kept)."""
    for node in program.exported.graph.nodes:
        for key in _DEBUG_META:
            node.meta.pop(key, None)
    return program_json(program.exported)


def loads(data: bytes) -> torch.export.ExportedProgram:
    """Inverse of dumps. The pickled sections are given as empty containers, so torch.load is never reached."""
    log = logging.getLogger(serde.__name__)
    level = log.level
    log.setLevel(logging.ERROR)     # it warns about every shape symbol of the export-time trace
    try:
        return serde.deserialize(serde.SerializedArtifact(data, {}, {}, ()))
    finally:
        log.setLevel(level)
