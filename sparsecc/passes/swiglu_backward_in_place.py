"""swiglu_backward_in_place: write the SwiGLU backward's two gradients into the storages of inputs that die there.

A gated MLP (Llama, Mistral, Qwen: down(silu(gate) * up)) has, in its backward, with g the gradient of the product:
    d_up = g * silu(gate)            d_gate = g * up * silu'(gate)
and g, gate and up (each [tokens, intermediate], the widest activations of the model) are usually read by nothing
else afterwards. An executor still allocates both gradients fresh (Inductor reuses an input's buffer only for a
kernel that is its single remaining reader; here each input has two). This pass emits
sparsecc::swiglu_grad_gate_(up, g, gate) then sparsecc::swiglu_grad_up_(g, gate) instead (ops/swiglu.py), which leave
d_gate in up's storage and d_up in g's: two fewer buffers of that size at the backward's widest point.

Recognition is by value, not by spelling (decompositions differ between dtypes and torch versions): a node whose
inputs, followed through pointwise ops (and dtype conversions and constant fills), come down to two tensors g and
gate of its own shape, is d_up if that expression evaluated in float64 at probe points (dtype conversions as
identities) equals g * silu(gate) to 1e-9; a node over g, gate and a third tensor up is d_gate if it equals
g * up * silu'(gate). The rewrite is exact up to rounding: the ops compute in float32 and round once, where the graph
rounded at its conversions.

It is applied only where it is provably safe in the graph's order and saves memory, else skipped with the reason
in the report:
g, gate and up are contiguous values of the same dtype computed in the graph (not inputs, not returned), in three
different storages, defined before the first reader of either gradient, and nothing reads up's or g's storage from
there on except through the gradients; and the ops' kernels hold less than the buffer they save (always, but for
the CPU fallback of a dtype or machine without the C++ kernel). The ops then run right before that first reader. An
in-place write of an intermediate is a write reorder_for_memory keeps ordered (memory.writes_input), and Inductor
re-inplaces them after functionalizing (copying instead wherever an old value were still read).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import human
from ..graph import call, nbytes
from ..memory import aliases_input, kernel_workspace, storage_roots, writes_input
from . import PassResult, Plan
from .dce import eliminate_dead_code

aten, prims = torch.ops.aten, torch.ops.prims
NAME = "swiglu_backward_in_place"
MAX_INTERIOR = 48      # pointwise nodes one gradient's expression may span (the decomposed d_gate has ~12)
_CONVERSIONS = (prims.convert_element_type.default, aten._to_copy.default)
_FILLS = (aten.full.default, aten.full_like.default, aten.ones_like.default, aten.zeros_like.default)


def _value(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _fill(node: fx.Node) -> float | None:
    """The constant a fill node holds (full, full_like, ones_like, zeros_like), or None."""
    if node.target in (aten.full.default, aten.full_like.default):
        v = node.args[1] if len(node.args) > 1 else None
    else:
        v = {aten.ones_like.default: 1.0, aten.zeros_like.default: 0.0}.get(node.target)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _evaluable(node: fx.Node) -> bool:
    """A node the probe evaluation can compute from its inputs: a pointwise op, a dtype conversion or a constant
    fill, with a floating-point result."""
    v = _value(node)
    if node.op != "call_function" or v is None or not v.dtype.is_floating_point:
        return False
    if node.target in _FILLS:
        return _fill(node) is not None
    if node.target is aten._to_copy.default:        # a dtype conversion, nothing else
        return set(node.kwargs) <= {"dtype"}
    return node.target in _CONVERSIONS or torch.Tag.pointwise in getattr(node.target, "tags", ())


def _inputs(node: fx.Node) -> list[fx.Node]:
    """What node's value depends on (a fill like another tensor depends on nothing)."""
    return [] if node.target in _FILLS else node.all_input_nodes


class _Expressions:
    """Per node: the stored tensors its value is a pointwise expression of (its leaves), and the nodes in between
    (its interior); None where it spans more than 3 leaves or MAX_INTERIOR nodes."""

    def __init__(self):
        self.memo: dict[fx.Node, tuple[frozenset, frozenset] | None] = {}

    def __call__(self, node: fx.Node):
        if node not in self.memo:
            self.memo[node] = None
            leaves, interior = set(), {node}
            for arg in _inputs(node):
                if _evaluable(arg):
                    sub = self(arg)
                    if sub is None:
                        return None
                    leaves |= sub[0]
                    interior |= sub[1]
                else:
                    leaves.add(arg)
            if len(leaves) <= 3 and len(interior) <= MAX_INTERIOR:
                self.memo[node] = (frozenset(leaves), frozenset(interior))
        return self.memo[node]


def _evaluate(node: fx.Node, interior: tuple, probes: dict[fx.Node, torch.Tensor]) -> torch.Tensor | None:
    """node's value with each leaf set to its float64 probe, conversions as identities; None if an op fails."""
    env = dict(probes)
    look = lambda a: env[a] if isinstance(a, fx.Node) else a      # noqa: E731
    try:
        for n in interior:
            args, kwargs = fx.node.map_aggregate((n.args, n.kwargs), look)
            if n.target in _CONVERSIONS:
                env[n] = args[0]
            elif n.target in _FILLS:
                env[n] = torch.tensor(_fill(n), dtype=torch.float64)
            else:
                env[n] = n.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op that cannot run on the probes: not recognised
        return None
    out = env.get(node)
    return out if isinstance(out, torch.Tensor) and out.dtype == torch.float64 else None


def _probes(n: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    randn = lambda: torch.randn(n, generator=gen, dtype=torch.float64)     # noqa: E731
    gate = torch.cat([torch.linspace(-30, 30, 16, dtype=torch.float64), randn()[16:] * 4])
    return randn(), gate, randn()


def _silu(z):
    return z * torch.sigmoid(z)


def _dsilu(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _equal(got, want) -> bool:
    return got is not None and got.shape == want.shape and torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def _find(gm: fx.GraphModule):
    """[(g, gate, up, d_up, d_gate, interior nodes of both)] recognised in gm, the last d_up first."""
    expressions, (pg, pz, pu) = _Expressions(), _probes()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    d_ups, three = {}, []
    for node in gm.graph.nodes:
        if not _evaluable(node) or (expr := expressions(node)) is None:
            continue
        leaves, interior = expr
        v = _value(node)
        if any(_value(leaf) is None or _value(leaf).shape != v.shape for leaf in leaves):
            continue
        interior = tuple(sorted(interior, key=order.__getitem__))
        if len(leaves) == 2:
            a, b = leaves
            for g, gate in ((a, b), (b, a)):
                if _equal(_evaluate(node, interior, {g: pg, gate: pz}), pg * _silu(pz)):
                    d_ups.setdefault((g, gate), []).append((node, interior))
        elif len(leaves) == 3:
            three.append((node, leaves, interior))
    found = []
    for (g, gate), ups in d_ups.items():
        d_up, up_interior = _outermost(ups)
        gates = [(node, interior, next(iter(leaves - {g, gate}))) for node, leaves, interior in three
                 if {g, gate} <= leaves]
        gates = [(node, interior, up) for node, interior, up in gates
                 if _equal(_evaluate(node, interior, {g: pg, gate: pz, up: pu}), pg * pu * _dsilu(pz))]
        if len({up for _, _, up in gates}) != 1:
            continue
        d_gate, gate_interior = _outermost([(node, interior) for node, interior, _ in gates])
        found.append((g, gate, gates[0][2], d_up, d_gate, set(up_interior) | set(gate_interior)))
    # g * up is symmetric, so the forward's silu(gate) * up (recomputed in the backward) also matches "d_up" with
    # up as g, paired with the true d_gate: a correct rewrite too, but the gradient is what comes last
    return sorted(found, key=lambda f: order[f[3]], reverse=True)


def _outermost(matches):
    """The match no other one contains (a conversion after the expression computes the same value)."""
    inner = {n for _, interior in matches for n in interior[:-1]}
    return next((m for m in matches if m[0] not in inner), matches[-1])


def _unsafe(gm: fx.GraphModule, g, gate, up, d_up, d_gate, interior) -> tuple[str, fx.Node | None]:
    """(why the in-place form would be unsafe here or "", the node the ops go before)."""
    for name, leaf in (("g", g), ("gate", gate), ("up", up)):
        v = _value(leaf)
        if v.dtype != _value(d_up).dtype or not v.is_contiguous():
            return f"{name} ({leaf.name}) is not a contiguous {_value(d_up).dtype} tensor", None
    for d in (d_up, d_gate):
        if not _value(d).is_contiguous() or _value(d).dtype != _value(up).dtype:
            return f"{d.name} is not a contiguous {_value(up).dtype} tensor", None
    roots = storage_roots(gm)
    owners = {roots[g], roots[gate], roots[up]}
    if len(owners) != 3:
        return "g, gate and up share a storage", None
    for name, leaf in (("g", g), ("up", up)):
        if roots[leaf].op != "call_function":
            return f"{name} ({leaf.name}) is not computed in the graph", None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    readers = [u for d in (d_up, d_gate) for u in d.users]
    if not d_up.users or not d_gate.users:
        return "a gradient is not read", None
    first = min(readers, key=order.__getitem__)
    if any(order[leaf] > order[first] for leaf in (g, gate, up)):
        return f"an input is computed after {first.name}, the first reader of a gradient", None
    saved = nbytes(_value(up))
    for op, args in ((torch.ops.sparsecc.swiglu_grad_gate_.default, (up, g, gate)),
                     (torch.ops.sparsecc.swiglu_grad_up_.default, (g, gate))):
        values = [_value(a) for a in args]
        workspace = kernel_workspace(op, values, {}, values[0].device)
        if workspace >= saved:       # the CPU fallback's float32 chunks (no C++ kernel for this dtype or machine)
            return f"{op._opname}'s temporaries ({human(workspace)}) outweigh the buffer it saves ({human(saved)})", \
                None
    dying = _dying(d_up, d_gate, interior)
    written = {roots[g], roots[up]}
    for node in gm.graph.nodes:
        if order[node] < order[first] or node in dying or (aliases_input(node) and not writes_input(node)):
            continue                                        # (a view reads nothing; its readers are checked)
        hit = next((a for a in node.all_input_nodes if roots.get(a) in written), None)
        if hit is not None:
            return f"{node.name} reads {hit.name}'s storage after the gradients are written there", None
    return "", first


def _dying(d_up, d_gate, interior) -> set[fx.Node]:
    """The gradients and the interior nodes only they read: gone once their readers read up and g instead."""
    dying = {d_up, d_gate}
    changed = True
    while changed:
        changed = False
        for n in interior - dying:
            if n.users and all(u in dying for u in n.users):
                dying.add(n)
                changed = True
    return dying


def swiglu_backward_in_place(gm: fx.GraphModule, plan: Plan) -> PassResult:
    result = PassResult(NAME)
    rewritten, claimed = 0, set()
    for g, gate, up, d_up, d_gate, interior in _find(gm):
        if claimed & {g, up, d_up, d_gate}:      # another match rewrote these already
            continue
        why, first = _unsafe(gm, g, gate, up, d_up, d_gate, interior)
        if why:
            result.notes.append(f"skipped the SwiGLU backward over {gate.name} and {up.name}: {why}")
            continue
        with gm.graph.inserting_before(first):
            call(gm.graph, torch.ops.sparsecc.swiglu_grad_gate_.default, (up, g, gate), NAME)
            call(gm.graph, torch.ops.sparsecc.swiglu_grad_up_.default, (g, gate), NAME)
        d_gate.replace_all_uses_with(up)
        d_up.replace_all_uses_with(g)
        claimed |= {g, up, d_up, d_gate}
        rewritten += 1
        result.notes.append(f"SwiGLU backward over {gate.name} and {up.name}: d_gate written into {up.name}, "
                            f"d_up into {g.name} (before {first.name})")
    removed = eliminate_dead_code(gm) if rewritten else 0
    gm.recompile()
    result.counts = {"swiglu_backwards_in_place": rewritten, "nodes_removed": removed}
    return result
