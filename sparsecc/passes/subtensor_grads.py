"""subtensor_grads: for a Channels rule, compute the weight gradient only for the selected channels.

The gradient output g of the parameter is replaced by pad(select(g)), and the selection is pushed up
through the backward graph by local rules (a table from aten op to a small function) until it reaches
forward tensors. There it selects the *activation* before it is saved, so the forward keeps only the
k selected channels alive for backward. Where no rule applies, the selection stays where it stopped:
when that leaves no contraction computing fewer channels, the rule buys nothing and is rejected with an
error that names the parameter and the op; otherwise the report notes where the selection stopped.
A sparse weight's gradient is already computed at its stored entries only; its k channels are sliced
from that.

On the Triton path (the parameter on CUDA, or SPARSECC_TRITON=1) a GEMM the selection reaches becomes
sparsecc::channels_weight_grad, whose generated kernel reads both operands in full through strides: the
selection stops there, so the forward saves the whole activation instead of a k-channel copy of it.
On the CPU path the graph stays pure aten.

The table has rules only for ops that can reach this pass. Every joint graph is traced below autograd (so
reshape, a CompositeImplicitAutograd op, is already view) with Inductor's decompositions (the backend,
compile_train_step) or core ATen's (portable_graph, for export), and both turn t and transpose into permute,
_unsafe_view into view and embedding_dense_backward into an accumulating index_put (torch 2.13: the masked
op; 2.11: index_put): rules for those could never fire (tests/test_subtensor_rules.py checks both tables and
reaches every rule left) and were removed.
Were one of those ops to appear, the selection would stop there and slice the full gradient: correct, only
not cheaper.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .._torch import detect_fake_mode
from ..config import Channels
from ..errors import ConfigError
from ..graph import backward_nodes, call, output_values, set_output_values, val
from ..ops.channels import on_triton  # (importing sparsecc.ops registers the sparsecc:: ops)
from . import ParamPlan, PassResult, Plan
from .dce import eliminate_dead_code

aten, prims = torch.ops.aten, torch.ops.prims
NAME = "subtensor_grads"


@dataclass
class _Selector:
    """Emits select(x, dim) for one parameter's channel choice and pushes it up the graph."""

    gm: fx.GraphModule
    k: int
    index: fx.Node | None              # sparsecc::index_constant of the chosen channels, or None for the first k
    backward: set[fx.Node]
    triton: bool                       # GEMMs become sparsecc::channels_weight_grad (a generated kernel)
    reached: list[str] = field(default_factory=list)   # forward tensors selected before being saved
    sliced: list[str] = field(default_factory=list)    # contractions (GEMM, conv, scatter) now computing k channels
    stops: list[tuple[str, str]] = field(default_factory=list)   # (why, "node (op)") where the selection stopped

    def emit_after(self, anchor: fx.Node, target, args, kwargs=None) -> fx.Node:
        with self.gm.graph.inserting_after(anchor):
            return call(self.gm.graph, target, args, NAME, kwargs)

    def contraction(self, x: fx.Node, target, args, kwargs=None) -> fx.Node:
        """Emit the k-channel version of the contraction x (a GEMM, convolution or scatter)."""
        self.sliced.append(f"{x.name} ({target})")
        return self.emit_after(x, target, args, kwargs)

    def take(self, x: fx.Node, dim: int, after: fx.Node) -> fx.Node:
        """The selection itself, placed right after `after` (and after the index constant, if any)."""
        if self.index is not None and after.op == "placeholder":
            after = self.index  # the index constant sits after the last graph input
        return self.emit_after(after, *channel_selection(x, dim, self.k, self.index))

    def select(self, x: fx.Node, dim: int) -> fx.Node:
        """A node equal to select(x, dim), computed as early in the graph as the rules allow."""
        if x not in self.backward or x.op == "placeholder":   # an activation, or a graph input (a tangent)
            taken = self.take(x, dim, x)
            if x.op == "placeholder" or self.index is not None:
                return taken  # a graph input (resident anyway) or already a compact copy
            self.reached.append(x.name)
            return self.emit_after(taken, aten.clone.default, (taken,))  # save k channels, not a view of all
        rule = RULES.get(x.target)
        if rule is None:
            return self.stop(x, dim, "no rule")
        if len(x.users) > 1 and x.target not in VIEWS:
            return self.stop(x, dim, "shared")
        out = rule(self, x, dim)
        return out if out is not None else self.stop(x, dim, f"dim {dim}")

    def stop(self, x: fx.Node, dim: int, why: str) -> fx.Node:
        self.stops.append((why, f"{x.name} ({x.target})"))
        return self.take(x, dim, x)


def why_stopped(stops: list[tuple[str, str]]) -> str:
    """The reasons the selection stopped, grouped, in words: "add_30 (aten.add.Tensor) and mul_54 (...) also feed
    other gradients, so they are needed in full; sparsecc has no rule restricting expand_2 (...) to channels"."""
    groups: dict[str, list[str]] = {}
    for why, what in stops:
        if what not in groups.setdefault(why, []):
            groups[why].append(what)

    def listed(items, word="and"):
        return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"
    parts = []
    if "shared" in groups:
        one = len(groups["shared"]) == 1
        parts.append(f"{listed(groups['shared'])} also feed{'s' if one else ''} other gradients, so "
                     f"{'it is' if one else 'they are'} needed in full")
    if "no rule" in groups:
        parts.append(f"sparsecc has no rule restricting {listed(groups['no rule'], 'or')} to some channels")
    for why in sorted(w for w in groups if w.startswith("dim ")):
        parts.append(f"{listed(groups[why], 'or')} cannot be restricted to channels of its {why}")
    return "; ".join(parts)


def channel_part(grad: fx.Node, p: ParamPlan) -> tuple[fx.Node, fx.Node | None] | None:
    """(k-channel gradient, channel index or None for the first k) when this pass sliced p's gradient (the
    output is then pad(part) or index_put(zeros, [.., index], part)), else None."""
    if not isinstance(p.rule, Channels) or grad.meta.get("sparsecc_pass") != NAME:
        return None
    if grad.target is aten.constant_pad_nd.default:          # pad(part): the first k channels
        return grad.args[0], None
    return grad.args[2], grad.args[1][p.rule.axis]           # index_put(zeros, [.., index], part)


def channel_selection(x: fx.Node, dim: int, k: int, index: fx.Node | None) -> tuple:
    """(op, args) selecting the channels of x on dim: a slice view of the first k, or a copy at the index.
    aten.index, not index_select: the graph is already decomposed for Inductor, which lowers index."""
    if index is None:
        return aten.slice.Tensor, (x, dim, 0, k)
    return aten.index.Tensor, (x, [None] * dim + [index])


def _shape(node) -> tuple:
    return tuple(val(node).shape)


def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


# ---- rules: (selector, node, dim) -> replacement node, or None for "no match" ---------------------------

def _permute(s, x, d):
    src, dims = x.args
    j = dims[d] % len(dims)
    return s.emit_after(x, x.target, (s.select(src, j), dims))


def _view(s, x, d):
    """A reshape keeps dim d when some input dim j has the same size and the same number of elements before it."""
    src = x.args[0]
    out_shape, in_shape = _shape(x), _shape(src)
    if not _static(*out_shape, *in_shape):
        return None
    before = _prod(out_shape[:d])
    for j, size in enumerate(in_shape):
        if size == out_shape[d] and _prod(in_shape[:j]) == before:
            new_shape = list(out_shape)
            new_shape[d] = s.k
            return s.emit_after(x, x.target, (s.select(src, j), new_shape))
    return None


def _prod(sizes) -> int:
    out = 1
    for v in sizes:
        out *= v
    return out


def _mm(s, x, d):
    a, b = x.args
    if s.triton:            # a @ b at k rows (d=0) or columns (d=1): g^T @ x's Channels kernel with g = a^T
        g = s.emit_after(x, aten.permute.default, (a, [1, 0]))      # (t is decomposed for Inductor)
        s.sliced.append(f"{x.name} (sparsecc::channels_weight_grad)")
        return s.emit_after(g, torch.ops.sparsecc.channels_weight_grad.default,
                            (g, b, s.index, s.k, "in" if d == 1 else "out"))
    args = (s.select(a, 0), b) if d == 0 else (a, s.select(b, 1))
    return s.contraction(x, x.target, args)


def _bmm(s, x, d):
    a, b = x.args
    args = (s.select(a, d), b) if d in (0, 1) else (a, s.select(b, 2))
    return s.contraction(x, x.target, args)


def _sum(s, x, d):
    src, dims = x.args[0], x.args[1]
    keepdim = x.args[2] if len(x.args) > 2 else x.kwargs.get("keepdim", False)
    rank = len(_shape(src))
    reduced = sorted(r % rank for r in dims)
    kept = [j for j in range(rank) if keepdim or j not in reduced]
    j = kept[d]
    if j in reduced:
        return None
    return s.emit_after(x, x.target, (s.select(src, j),) + tuple(x.args[1:]), x.kwargs)


def _pointwise(s, x, d):
    """Elementwise ops: select every tensor operand that is not broadcast along dim d."""
    rank = len(_shape(x))
    args = []
    for a in x.args:
        if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor):
            shape = _shape(a)
            j = d - (rank - len(shape))
            a = s.select(a, j) if j >= 0 and shape[j] != 1 else a
        args.append(a)
    return s.emit_after(x, x.target, tuple(args), x.kwargs)


def _full(s, x, d):
    """A constant-filled tensor: the same constant, k channels wide."""
    shape = list(x.args[0])
    shape[d] = s.k
    return s.emit_after(x, x.target, (shape,) + tuple(x.args[1:]), x.kwargs)


def _slice_scatter(s, x, d):
    base, src, dim = x.args[:3]
    if dim % len(_shape(x)) == d:
        return None
    return s.emit_after(x, x.target, (s.select(base, d), s.select(src, d)) + tuple(x.args[2:]), x.kwargs)


def _index_put_accumulate(s, x, d):
    """Embedding backward as Inductor decomposes it: zeros.index_put_(indices, values, accumulate)."""
    zeros, mask, indices, values = x.args
    n_idx = len(indices)
    if d < n_idx:
        return None
    if zeros.target is not aten.full.default:
        return None
    new_zeros = _full(s, zeros, d)
    vd = len(_shape(values)) - (len(_shape(x)) - d)
    new_values = s.select(values, vd)
    mshape = _shape(mask)
    md = len(mshape) - (len(_shape(values)) - vd)
    new_mask = s.select(mask, md) if md >= 0 and mshape[md] != 1 else mask
    return s.contraction(new_zeros, x.target, (new_zeros, new_mask, indices, new_values))


def _index_put(s, x, d):
    """Embedding backward as torch 2.11's Inductor decomposes it: index_put(zeros, [indices], values, accumulate)
    (2.13: the masked op above). A channel dim past the indexed ones is one of values' trailing dims."""
    base, indices, values = x.args[:3]
    if d < len(indices) or any(i is None for i in indices):
        return None
    vd = len(_shape(values)) - (len(_shape(x)) - d)
    new_values = s.select(values, vd) if vd >= 0 and _shape(values)[vd] != 1 else values
    new_base = s.select(base, d)
    return s.contraction(x, x.target, (new_base, indices, new_values) + tuple(x.args[3:]), x.kwargs)


def _getitem(s, x, d):
    parent, i = x.args
    if parent.target is aten.convolution_backward.default and i == 1:
        return _conv_weight_grad(s, x, parent, d)
    if parent.target is torch.ops.sparsecc.linear_cross_entropy.default and i == 2:
        return _fused_loss_weight_grad(s, x, parent, d)
    return None


def _fused_loss_weight_grad(s, x, op, d):
    """The fused output projection + loss computes its weight gradient for k channels itself: the op is
    changed in place (its other results stay as they were) and x, its weight gradient, becomes [.., k, ..]."""
    if len(op.args) > 11 and op.args[12] >= 0:
        return None                                  # already restricted (by a rule for the same weight)
    op.args = op.args[:11] + (s.index, s.k, d)
    fake = val(op.args)
    with detect_fake_mode(fake):
        op.meta["val"] = op.target(*fake)
    x.meta["val"] = op.meta["val"][2]
    s.sliced.append(f"{op.name} (sparsecc::linear_cross_entropy)")
    return x


def _conv_weight_grad(s, x, cb, d):
    """The weight gradient of a convolution for channels of dim d (0 = out, 1 = in)."""
    g, inp, w, _bias, stride, padding, dilation, transposed, out_pad, groups, _mask = cb.args
    if transposed:
        return None
    c_out, c_in_per_group = _shape(w)[:2]
    if groups == 1:
        if d == 1:
            args = (g, s.select(inp, 1), s.select(w, 1), None, stride, padding, dilation, False, out_pad, 1)
        else:
            args = (s.select(g, 1), inp, s.select(w, 0), None, stride, padding, dilation, False, out_pad, 1)
    elif groups == c_out and c_in_per_group == 1 and _shape(inp)[1] == c_out and d == 0:  # depthwise
        args = (s.select(g, 1), s.select(inp, 1), s.select(w, 0), None, stride, padding, dilation, False, out_pad, s.k)
    else:
        return None
    new_cb = s.contraction(x, cb.target, args + ([False, True, False],))
    return s.emit_after(new_cb, operator.getitem, (new_cb, 1))


VIEWS = {aten.permute.default, aten.view.default}
_POINTWISE = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar,
              aten.div.Scalar, aten.neg.default, aten.clone.default, aten._to_copy.default,
              prims.convert_element_type.default]
RULES = {
    aten.permute.default: _permute,
    aten.view.default: _view,
    aten.mm.default: _mm,
    aten.bmm.default: _bmm,
    aten.sum.dim_IntList: _sum,
    aten.full.default: _full,
    aten.slice_scatter.default: _slice_scatter,
    aten._unsafe_masked_index_put_accumulate.default: _index_put_accumulate,
    aten.index_put.default: _index_put,
    operator.getitem: _getitem,
    aten.alias.default: _pointwise,     # an op's saved result as its backward reads it: the identity
    **{op: _pointwise for op in _POINTWISE},
}


# ---- the pass ---------------------------------------------------------------------------------------------

def _index_node(gm: fx.GraphModule, p: ParamPlan) -> fx.Node | None:
    """The chosen channel indices as a graph constant, placed after the last graph input."""
    if p.indices is None:
        return None
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    device = last_input.meta["val"].device
    with gm.graph.inserting_after(last_input):
        return call(gm.graph, torch.ops.sparsecc.index_constant.default, (p.indices.tolist(), device), NAME)


def _scatter_back(gm: fx.GraphModule, part: fx.Node, p: ParamPlan, dim: int, index: fx.Node | None) -> fx.Node:
    """The full-shape gradient: the selected part, zeros elsewhere."""
    out = gm.graph.output_node()
    with gm.graph.inserting_before(out):
        if index is None:
            pad = [0, 0] * (len(p.shape) - 1 - dim) + [0, p.shape[dim] - _shape(part)[dim]]
            return call(gm.graph, aten.constant_pad_nd.default, (part, pad, 0.0), NAME)
        v = val(part)
        zeros = call(gm.graph, aten.full.default, (list(p.shape), 0.0), NAME,
                     {"dtype": v.dtype, "layout": torch.strided, "device": v.device, "pin_memory": False})
        return call(gm.graph, aten.index_put.default, (zeros, [None] * dim + [index], part), NAME)


def subtensor_grads(gm: fx.GraphModule, plan: Plan) -> PassResult:
    result = PassResult(NAME)
    outs = output_values(gm)
    backward = backward_nodes(gm, plan.num_fwd_outputs)
    primals = gm.graph.find_nodes(op="placeholder")
    sliced = 0
    for p in plan.params:
        grad = outs[plan.grad_position(p)]
        if not isinstance(p.rule, Channels) or grad is None:
            continue
        dim, k = p.rule.axis, p.rule.count(p.shape[p.rule.axis])
        if k == p.shape[dim]:
            result.notes.append(f"{p.name}: Channels keeps all {k} channels; trained in full")
            continue
        index = _index_node(gm, p)
        selector = _Selector(gm, k, index, backward, on_triton(val(primals[p.index])))
        part = selector.select(grad, dim)
        outs[plan.grad_position(p)] = _scatter_back(gm, part, p, dim, index)
        if selector.stops and not selector.sliced and not p.sparse:
            raise ConfigError(
                f"Channels rule on {p.name!r}: sparsecc cannot compute this gradient for a subset of channels of "
                f"dim {dim} ({why_stopped(selector.stops)}). Use dim='in'/'out' on a linear, conv or embedding "
                f"weight, or train {p.name!r} in 'full'")
        sliced += 1
        side = "input" if dim == 1 else "output"
        where = f" by {', '.join(selector.sliced)}" if selector.sliced else ""
        saved = (f"; the forward keeps only those channels of {', '.join(selector.reached)} for the backward"
                 if selector.reached else "")
        also = (f"; part of it is still computed for all channels and then cut down, because "
                f"{why_stopped(selector.stops)}" if selector.stops else "")
        result.notes.append(f"{p.name}: gradient computed for {k} of {p.shape[dim]} {side} channels (dim {dim})"
                            f"{where}{saved}{also}")
    set_output_values(gm, outs)
    result.counts["grads_sliced"] = sliced
    result.counts["nodes_removed"] = eliminate_dead_code(gm)
    return result
