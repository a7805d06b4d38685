"""sparsify: linear and 1x1-convolution calls on sparse weights become sparsecc:: sparse ops.

Runs before AOTAutograd — on Dynamo's graph (torch-level calls; the backend) or on the one-graph step's
captured forward + loss (ATen calls; sparsify_step) — so the sparse ops' autograd formulas define the
backward: the input gradient uses the transposed sparse weight and the weight gradient is computed at the
stored entries only. The compressed operands (index tensors, live-entry multipliers, dense masks) become
extra graph inputs (buffers in the captured step); mask updates refresh them in place, so nothing recompiles.

Sparse weights come from `sparsecc.sparsify` (recorded on the model) or are picked up where the graph
multiplies a parameter by a 0/1 tensor input (torch.nn.utils.prune's weight_orig * weight_mask,
a torch.nn.utils.parametrize masking). Each candidate call goes to the cost model; a call it refuses,
or any other use of a recorded sparse weight, reads the weight masked densely, so pruned entries get
no gradient either way and stay exactly zero.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import cost_model
from .._torch import FUNCTIONAL_LINEAR, detect_fake_mode
from ..errors import ConfigError
from ..ops.device import kernel_dtypes
from ..sparse_registry import register
from ..sparse_weights import SparseWeight, conv1x1
from ..sparsity import Unstructured
from . import PassResult

NAME = "sparsify"
aten = torch.ops.aten
# Dynamo's graph calls torch functions; the one-graph step's captured graph calls ATen ops (same arguments)
_LINEAR = {FUNCTIONAL_LINEAR, torch.nn.functional.linear, aten.linear.default}
_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.nn.functional.conv1d: 1, torch.nn.functional.conv2d: 2,
         aten.conv1d.default: 1, aten.conv2d.default: 2}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass
class Source:
    """Where a sparse weight's values come from in the graph."""

    sw: SparseWeight
    param: fx.Node              # the parameter's graph input (placeholder, or get_attr in the captured step)
    weight: fx.Node             # the node the calls read: the parameter, or its product with a mask input
    mask_input: int | None      # graph-input position of a picked-up mask (checked at every call)


@dataclass
class Rewrite:
    """What sparsify did to one graph: the extra inputs it added and what the rest of the compiler needs."""

    result: PassResult
    extra_inputs: list[torch.Tensor] = field(default_factory=list)
    sparse_params: set[str] = field(default_factory=set)
    picked_masks: dict[int, SparseWeight] = field(default_factory=dict)   # input position -> its weight
    graphs: dict[str, str] = field(default_factory=dict)                 # Dynamo's graph before and after
    weights: list[SparseWeight] = field(default_factory=list)  # kept alive by the compiled graph's wrapper
    operands: dict[str, tuple[str, str]] = field(default_factory=dict)  # added buffer -> (weight, operand name)


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.dim() >= 2 and \
        bool(((t == 0) | (t == 1)).all())


def _unwrap_to(node):
    """x.to(dtype) -> x (prune casts its mask)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to":
        return node.args[0]
    return node


def _picked_up(gm, inputs, params) -> list[tuple[fx.Node, fx.Node, int, int]]:
    """(product node, parameter placeholder, parameter position, mask position) for param * 0/1-mask products."""
    position = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.mul, operator.mul):
            continue
        a, b = (_unwrap_to(x) for x in node.args[:2])
        for p, m in ((a, b), (b, a)):
            if p in position and m in position and position[p] in params and _is_mask(inputs[position[m]]) \
                    and inputs[position[m]].shape == inputs[position[p]].shape:
                found.append((node, p, position[p], position[m]))
                break
    return found


def _recorded(root, config, params_by_pos) -> dict[int, tuple[str, object, torch.Tensor]]:
    """position -> (name, pattern, mask) for graph parameters that sparsecc.sparsify recorded on the model
    (looked up by tensor, so a tied weight is found under whichever name the graph knows it by)."""
    patterns = getattr(root, "sparsecc_patterns", {}) if root is not None else {}
    masks = getattr(root, "sparsecc_masks", {}) if root is not None else {}
    named = dict(root.named_parameters(remove_duplicate=False)) if root is not None else \
        {n: p for n, p in params_by_pos.values()}
    if config.sparsity is not None:
        for name, pattern in config.sparsity.resolve(named).items():
            if patterns.get(name) != pattern:
                raise ConfigError(f"option 'sparsity' makes {name!r} {pattern}, but the model records "
                                  f"{patterns.get(name, 'no pattern')} for it; call sparsecc.sparsify(model, spec) "
                                  f"with the same spec before compiling")
    by_tensor = {id(named[n]): n for n in patterns if n in named}
    out = {}
    for pos, (_, param) in params_by_pos.items():
        name = by_tensor.get(id(param))
        if name is not None:
            if (param.detach() * ~masks[name]).count_nonzero():
                raise ConfigError(f"sparse weight {name!r} has nonzeros outside its recorded mask; it was changed "
                                  f"after sparsecc.sparsify - call sparsify again to re-prune it")
            out[pos] = (name, patterns[name], masks[name])
    return out


def _conv_args(node) -> dict | None:
    args = dict(zip(_CONV_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _value(node):
    """A node's example value: Dynamo's meta["example_value"], an exported graph's meta["val"]."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _why_not_conv(args, dims: int) -> str | None:
    def ones(v, n):
        return all(int(s) == n for s in ((v,) * dims if isinstance(v, int) else v))
    if any(s != 1 for s in _value(args["weight"]).shape[2:]):
        return "kernel is not 1x1"
    if not ones(args.get("stride", 1), 1) or not ones(args.get("dilation", 1), 1):
        return "stride or dilation is not 1"
    padding = args.get("padding", 0)
    if padding != "valid" and (isinstance(padding, str) or not ones(padding, 0)):
        return "padded"
    if args.get("groups", 1) != 1:
        return "grouped"
    return None


def _hint(v) -> int:
    return int(v.node.hint) if isinstance(v, torch.SymInt) else int(v)


def sparsify(gm: fx.GraphModule, inputs: list, params_by_pos: dict[int, tuple[str, torch.Tensor]], root, config
             ) -> Rewrite:
    """Rewrite gm (Dynamo's graph) in place; inputs are its example inputs, params_by_pos its parameter inputs."""
    rewrite = Rewrite(PassResult(NAME))
    placeholders = gm.graph.find_nodes(op="placeholder")
    sources: list[Source] = []
    for pos, (name, pattern, mask) in _recorded(root, config, params_by_pos).items():
        sw = register(inputs[pos], SparseWeight.create(name, pattern, mask, inputs[pos].dtype))
        rewrite.weights.append(sw)
        sources.append(Source(sw, placeholders[pos], placeholders[pos], None))
    for product, p, pos, mask_pos in _picked_up(gm, inputs, params_by_pos):
        name, mask = params_by_pos[pos][0], inputs[mask_pos] != 0
        sw = SparseWeight.create(name, Unstructured(max(mask.float().mean().item(), 1e-9)), mask, inputs[pos].dtype)
        sources.append(Source(sw, p, product, mask_pos))
        rewrite.picked_masks[mask_pos] = sw
    _rewrite_calls(gm, sources, config, rewrite, _add_inputs)
    for src in sources:
        if src.mask_input is None:
            _mask_other_uses(gm, src, rewrite)
        rewrite.sparse_params.add(src.sw.name)
    gm.graph.lint()
    gm.recompile()
    return rewrite


def sparsify_step(gm: fx.GraphModule, model, masked: dict[str, str], config) -> Rewrite:
    """The one-graph step's form of the rewrite, on its captured forward + loss (ATen calls; parameters and
    buffers read with get_attr, the model's under "model."), where each weight sparsecc.sparsify recorded is
    read as weight * mask (masked: weight name -> mask buffer name). Calls the cost model accepts read that
    product through the sparse ops; its other uses stay dense. The compressed operands become buffers of gm,
    so the step passes them like any buffer."""
    rewrite = Rewrite(PassResult(NAME))
    attrs = {n.target: n for n in gm.graph.find_nodes(op="get_attr")}
    sources = []
    for name, buffer in masked.items():
        param, mask = attrs.get(f"model.{name}"), attrs.get(buffer)
        product = next((u for u in (param.users if param is not None else ())
                        if u.target == aten.mul.Tensor and set(u.args[:2]) == {param, mask}), None)
        if product is None:       # a tied alias: the graph reads the tensor under its first name
            continue
        sw = SparseWeight.create(name, model.sparsecc_patterns[name], model.sparsecc_masks[name], _value(param).dtype)
        sources.append(Source(sw, param, product, None))
        rewrite.sparse_params.add(name)
    _rewrite_calls(gm, sources, config, rewrite, _add_buffers)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return rewrite


def _rewrite_calls(gm, sources: list[Source], config, rewrite: Rewrite, add_inputs) -> None:
    """Replace each linear / 1x1-conv call on a sparse weight that the cost model accepts by the sparse op;
    add_inputs(gm, tensors, prefix, rewrite) makes the compressed operands readable in gm."""
    result = rewrite.result
    rewritten = refused = 0
    flops_saved = 0
    candidates: list[tuple[Source, fx.Node, str, cost_model.LinearShape]] = []
    for src in sources:
        sw = src.sw
        for user in list(src.weight.users):
            call, why = _candidate(user, src.weight)
            if call is None:
                if why:
                    result.notes.append(f"{sw.name}: {user.name} not rewritten: {why}")
                continue
            x_val = _value(user.args[0])
            dtypes = kernel_dtypes(x_val) if x_val is not None else ()
            if x_val is None or x_val.dtype not in dtypes or x_val.dtype != sw.dense.dtype:
                names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
                result.notes.append(f"{sw.name}: {user.name} kept dense: dtype {getattr(x_val, 'dtype', None)}"
                                    f"{f' (the sparse kernels here take {names})' if names else ''}")
                refused += 1
                continue
            out, inp = sw.mask.shape[0], sw.mask[0].numel()
            candidates.append((src, user, call, cost_model.LinearShape(_hint(x_val.numel()) // inp, out, inp,
                                                                       x_val.dtype, sw.format.name, sw.block, sw.density)))
    if config.cost_model == "measure":
        decisions = cost_model.decide_all([shape for *_, shape in candidates])
    elif config.cost_model == "off":
        decisions = [cost_model.Decision(True, "cost model off: every candidate is rewritten")] * len(candidates)
    else:
        decisions = [cost_model.Decision(False, "cost_model='dense': read masked")] * len(candidates)
    extras: dict[int, list[fx.Node]] = {}
    for (src, user, call, shape), decision in zip(candidates, decisions):
        sw = src.sw
        if not decision.rewrite:
            result.notes.append(f"{sw.name}: {user.name} ({call}) kept dense: {decision.reason}")
            refused += 1
            continue
        if id(src) not in extras:
            extras[id(src)] = add_inputs(gm, sw.inputs(), f"{sw.name}_sparse", rewrite)
            rewrite.operands.update({n.target: (sw.name, key) for n, key in zip(extras[id(src)], sw.input_names())
                                     if n.op == "get_attr"})
        _replace(gm, user, call, src.weight, sw, extras[id(src)])
        saved = int(shape.dense_flops * (1 - sw.density))
        flops_saved += saved
        rewritten += 1
        result.notes.append(f"{sw.name}: {user.name} ({call}, {shape.tokens}x{shape.inp}->{shape.out}) -> "
                            f"sparsecc::{sw.pattern.op} [{sw.describe()}], est. fwd+bwd FLOPs saved {saved:,} "
                            f"({1 - sw.density:.0%}); {decision.reason}")
    result.counts.update(sparse_ops=rewritten, sparse_refused=refused, sparse_flops_saved=flops_saved)


def _candidate(node: fx.Node, weight: fx.Node) -> tuple[str | None, str | None]:
    """("linear" | "conv", None) when node is a call we can rewrite with weight as its weight, else (None, why)."""
    if node.op != "call_function":
        return None, None
    if node.target in _LINEAR:
        if len(node.args) > 1 and node.args[1] is weight and node.args[0] is not weight:
            return "linear", None
        return None, "the weight is not the linear's weight operand"
    if node.target in _CONV:
        args = _conv_args(node)
        if args.get("weight") is not weight:
            return None, "the weight is not the convolution's weight operand"
        why = _why_not_conv(args, _CONV[node.target])
        return (None, f"the convolution is {why}") if why else ("conv", None)
    return None, f"used by {node.target.__name__ if hasattr(node.target, '__name__') else node.target}"


def _add_inputs(gm, tensors, prefix, rewrite) -> list[fx.Node]:
    """New graph inputs after Dynamo's, marked as Dynamo marks inputs that no user code produced."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    fake_mode = detect_fake_mode([n.meta.get("example_value") for n in placeholders])
    last = placeholders[-1]
    nodes = []
    for i, t in enumerate(tensors):
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(re.sub(r"\W", "_", f"sparsecc_{prefix}_{i}"))
        last._dynamo_source = None
        last.meta["example_value"] = fake_mode.from_tensor(t) if fake_mode else t
        nodes.append(last)
        rewrite.extra_inputs.append(t)
    return nodes


def _add_buffers(gm, tensors, prefix, rewrite) -> list[fx.Node]:
    """New buffers of gm, read with get_attr at the top of its graph (the captured step's form)."""
    first = next(iter(gm.graph.nodes))
    nodes = []
    for i, t in enumerate(tensors):
        name = re.sub(r"\W", "_", f"sparsecc_{prefix}_{i}")
        gm.register_buffer(name, t)
        with gm.graph.inserting_before(first):
            nodes.append(gm.graph.get_attr(name))
    return nodes


def _replace(gm, node, call, weight, sw, extra):
    if call == "linear":
        x, _, *rest = node.args
        bias = rest[0] if rest else node.kwargs.get("bias")
        target, args = sw.format.linear, (x, weight, bias, sw.pattern.static_arg, *extra)
    else:
        a = _conv_args(node)
        target, args = conv1x1, (sw.format.name, a["input"], weight, a.get("bias"), sw.pattern.static_arg, *extra)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _mask_other_uses(gm, src: Source, rewrite: Rewrite) -> None:
    """Every use of a recorded sparse weight the rewrite left dense reads weight * mask instead."""
    users = [u for u in src.param.users]
    dense_users = [u for u in users if u.target not in (src.sw.format.linear, conv1x1)]
    if not dense_users:
        return
    (mask,) = _add_inputs(gm, [src.sw.dense], f"{src.sw.name}_mask", rewrite)
    with gm.graph.inserting_after(mask):
        masked = gm.graph.call_function(torch.mul, (src.param, mask))
    for u in dense_users:
        u.replace_input_with(src.param, masked)
    rewrite.result.notes.append(f"{src.sw.name}: {', '.join(u.name for u in dense_users)} read the weight "
                                f"masked densely (pruned entries get no gradient)")
