"""Every rule of subtensor_grads' table, reached by a real joint graph and checked against eager autograd.

Each case is a small model whose backward puts one op between the loss and a Channels weight's gradient. For
each: the rule for that op fired and returned a node k channels wide on the selected dim (a spy around the
table's entry), and the compiled gradient equals eager autograd's with the untrained channels zeroed by hand.
The table must not hold a rule that no case reaches: the ops sparsecc's decompositions remove can never appear
in a joint graph (checked below), and rules for them were deleted."""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._decomp import core_aten_decompositions
from torch._inductor.decomposition import select_decomp_table

import sparsecc
from sparsecc.passes import subtensor_grads as sg

aten, prims = torch.ops.aten, torch.ops.prims
EMBEDDING_GRADS = (aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default)


def embedding_grad_op():
    """The op Inductor's decompositions make of embedding_dense_backward: torch 2.13 the masked accumulating
    index_put, 2.11 a plain index_put (each has its rule; the other version's is not reached)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    graph = make_fx(lambda g, i: aten.embedding_dense_backward(g, i, 10, -1, False),
                    decomposition_table=select_decomp_table())(torch.randn(3, 4), torch.tensor([1, 2, 3])).graph
    return next(op for op in EMBEDDING_GRADS if graph.find_nodes(op="call_function", target=op))
K = 4                                      # Channels(0.5) of 8 channels: the first 4 are trained


class Head(nn.Module):
    """A linear layer (6 -> 8, its weight trained on 4 of 8 output channels) followed by f, whose backward holds
    the op under test."""

    def __init__(self, f):
        super().__init__()
        self.a, self.f = nn.Linear(6, 8), f

    def forward(self, x, m):
        return self.f(self.a(x), m)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, m):
        return torch.tanh(self.a(x)) * m


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Embedding(10, 8)

    def forward(self, ids, m):
        return self.a(ids) * m


@dataclass
class Case:
    model: Callable[[], nn.Module]
    x: Callable[[], torch.Tensor]
    m: Callable[[], torch.Tensor]          # a second (non-trained) input the forward combines with
    dim: str                               # Channels dim of a.weight
    ops: tuple                             # rules that must fire, each returning a K-wide node


def _randn(*shape):
    return lambda: torch.randn(*shape)


ONE = _randn(1)
CASES = {
    "mm/permute (linear, dim=out)": Case(lambda: Head(lambda h, m: h * m), _randn(5, 6), ONE, "out",
                                         (aten.mm.default, aten.permute.default, aten.mul.Tensor)),
    "view (linear on 3-D input)": Case(lambda: Head(lambda h, m: h * m), _randn(2, 5, 6), ONE, "out",
                                       (aten.mm.default, aten.view.default)),
    "alias (tanh's saved output)": Case(lambda: Head(lambda h, m: torch.tanh(h)), _randn(5, 6), ONE, "out",
                                        (aten.alias.default,)),
    "sub.Tensor (log_softmax)": Case(lambda: Head(lambda h, m: h.log_softmax(-1)), _randn(5, 6), ONE, "out",
                                     (aten.sub.Tensor,)),
    "add.Tensor (x*x summed)": Case(lambda: Head(lambda h, m: (h * h).sum(0)), _randn(5, 6), ONE, "out",
                                    (aten.add.Tensor,)),
    "div.Tensor (h / 4)": Case(lambda: Head(lambda h, m: h / 4.0), _randn(5, 6), ONE, "out", (aten.div.Tensor,)),
    "mul.Scalar (h ** 3)": Case(lambda: Head(lambda h, m: h.pow(3)), _randn(5, 6), ONE, "out", (aten.mul.Scalar,)),
    "div.Scalar (mean over the batch)": Case(lambda: Head(lambda h, m: h.mean(0)), _randn(5, 6), ONE, "out",
                                             (aten.div.Scalar,)),
    "neg (-h)": Case(lambda: Head(lambda h, m: -h), _randn(5, 6), ONE, "out", (aten.neg.default,)),
    "convert_element_type (h.double())": Case(lambda: Head(lambda h, m: h.double()), _randn(5, 6), ONE, "out",
                                              (prims.convert_element_type.default,)),
    "sum.dim_IntList (broadcast add)": Case(lambda: Head(lambda h, m: h + m), _randn(5, 6), _randn(3, 5, 8), "out",
                                            (aten.sum.dim_IntList,)),
    "slice_scatter/full (h[1:])": Case(lambda: Head(lambda h, m: h[1:] * m), _randn(5, 6), ONE, "out",
                                       (aten.slice_scatter.default, aten.full.default)),
    "bmm on dim 2": Case(lambda: Head(lambda h, m: torch.bmm(h, m)), _randn(2, 5, 6), _randn(2, 8, 3), "out",
                         (aten.bmm.default,)),
    "bmm on dim 1, clone": Case(lambda: Head(lambda h, m: torch.bmm(m, h.transpose(1, 2))), _randn(2, 5, 6),
                                _randn(2, 4, 8), "out", (aten.bmm.default, aten.clone.default)),
    "getitem of convolution_backward (dim=out)": Case(Conv, _randn(2, 8, 5, 5), _randn(2, 8, 5, 5), "out",
                                                      (operator.getitem,)),
    "getitem of convolution_backward (dim=in)": Case(Conv, _randn(2, 8, 5, 5), _randn(2, 8, 5, 5), "in",
                                                     (operator.getitem,)),
    "index_put accumulate (embedding)": Case(Embed, lambda: torch.randint(0, 10, (2, 7)), _randn(2, 7, 8), "in",
                                             (embedding_grad_op(),)),
}
# _to_copy only survives core ATen's decompositions: the portable (export) graph reaches it, tested below
PORTABLE_ONLY = {aten._to_copy.default}


@pytest.fixture
def fired(monkeypatch):
    """(op, dim, shape of the node the rule returned) for every rule the selection applies."""
    calls = []
    for op, rule in list(sg.RULES.items()):
        def spy(s, x, d, rule=rule, op=op):
            out = rule(s, x, d)
            calls.append((op, d, None if out is None else tuple(out.meta["val"].shape)))
            return out
        monkeypatch.setitem(sg.RULES, op, spy)
    return calls


def trained_mask(weight: torch.Tensor, dim: str) -> torch.Tensor:
    """True on the first K channels of dim ('out': rows, 'in': columns), written out for these shapes."""
    mask = torch.zeros_like(weight, dtype=torch.bool)
    if dim == "out":
        mask[:K] = True
    else:
        mask[:, :K] = True
    return mask


def loss_fn(out):
    return out.float().square().sum()


@pytest.mark.parametrize("name", CASES)
def test_rule_fires_and_gradient_is_the_masked_eager_one(name, fired):
    case = CASES[name]
    torch.manual_seed(0)
    model, x, m = case.model(), case.x(), case.m()
    ref = copy.deepcopy(model)
    loss_fn(ref(x, m)).backward()
    expected = torch.where(trained_mask(ref.a.weight, case.dim), ref.a.weight.grad, 0.0)

    scheme = sparsecc.UpdateScheme({"a.weight": sparsecc.Channels(0.5, dim=case.dim)})
    compiled = torch.compile(model, backend=sparsecc.backend(update=scheme, executor="eager"))
    loss_fn(compiled(x, m)).backward()

    torch.testing.assert_close(model.a.weight.grad, expected)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["a.weight"]   # the rest is frozen
    for op in case.ops:
        widths = [shape[d] for o, d, shape in fired if o is op and shape is not None]
        assert K in widths, f"{op}: rule not applied on a {K}-channel selection; fired: {fired}"


def test_to_copy_rule_on_the_portable_graph(fired):
    """portable_graph (what sparsecc.save exports) is traced with core ATen decompositions, which keep
    _to_copy: one SGD step of that graph equals eager SGD on the masked gradient."""
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)

        def forward(self, x):
            return self.a(x).double()

    torch.manual_seed(0)
    model, x, y = Cast(), torch.randn(5, 6), torch.randn(5, 8, dtype=torch.float64)
    ref = copy.deepcopy(model)
    mse = F.mse_loss
    step = sparsecc.compile_train_step(model, mse, optimizer=sparsecc.SGD(lr=0.5),
                                       update=sparsecc.UpdateScheme({"a.weight": sparsecc.Channels(0.5, dim="out")}),
                                       example_inputs=(x, y), executor="eager")
    fired.clear()
    graph, leaves = step.portable_graph(x, y)
    widths = [shape[d] for o, d, shape in fired if o is aten._to_copy.default and shape is not None]
    assert K in widths, fired

    weight, bias = ref.a.weight.detach().clone(), ref.a.bias.detach().clone()
    inputs = [weight, bias, *leaves, torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
    assert len(graph.graph.find_nodes(op="placeholder")) == len(inputs)
    graph(*inputs)                                              # updates weight in place
    mse(ref(x), y).backward()
    grad = torch.where(trained_mask(ref.a.weight, "out"), ref.a.weight.grad, 0.0)
    torch.testing.assert_close(weight, ref.a.weight.detach() - 0.5 * grad)
    torch.testing.assert_close(bias, ref.a.bias.detach())       # frozen


def test_every_rule_in_the_table_is_reached_by_a_case():
    covered = {op for case in CASES.values() for op in case.ops} | PORTABLE_ONLY | set(EMBEDDING_GRADS)
    assert covered == set(sg.RULES), {"never reached": set(sg.RULES) - covered, "no rule": covered - set(sg.RULES)}


# ---- ops that cannot reach the pass -----------------------------------------------------------------------

REMOVED = [aten.t.default, aten.transpose.int, aten._unsafe_view.default, aten.embedding_dense_backward.default]


@pytest.mark.parametrize("table", [select_decomp_table, core_aten_decompositions], ids=["inductor", "core_aten"])
def test_the_decompositions_sparsecc_traces_with_remove_the_ops_without_rules(table):
    decompositions = table()
    assert all(op in decompositions for op in REMOVED), [op for op in REMOVED if op not in decompositions]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::reshape", "CompositeImplicitAutograd")


class UsesThem(nn.Module):
    """t, transpose, reshape and an embedding in the forward: their backward would hold every removed op."""

    def __init__(self):
        super().__init__()
        self.emb, self.w = nn.Embedding(10, 8), nn.Parameter(torch.randn(8, 8))

    def forward(self, ids):
        h = self.emb(ids) @ self.w.t()
        return h.transpose(0, 1).reshape(-1, 4)


def test_joint_graphs_hold_none_of_the_removed_ops():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (3, 5))
    report = sparsecc.explain(UsesThem(), ids, update=sparsecc.UpdateScheme({"emb.weight": sparsecc.Channels(0.5),
                                                                            "w": sparsecc.Channels(0.5)}),
                              executor="eager")
    joint = report.graphs["joint/input"]
    assert "aten.mm.default" in joint and "aten.permute.default" in joint
    for op in ("aten.t.", "aten.transpose.", "aten.reshape.", "aten._unsafe_view.", "aten.embedding_dense_backward."):
        assert op not in joint, op
    assert str(embedding_grad_op()) in joint
