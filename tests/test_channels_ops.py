"""The CPU implementations of the Channels custom ops (sparsecc::channels_weight_grad, sgd_rows, adamw_rows),
sparsecc::index_constant and sparsecc::linear_cross_entropy: torch.library.opcheck on CPU tensors, and numbers
against torch's own reference (a full GEMM then the channels; torch.optim.SGD / AdamW run on the channels alone;
F.cross_entropy and autograd). The Triton kernels behind the Channels ops are tested in test_triton_kernels.py;
the block-sparse and CSR ops are opchecked in test_block_sparse_ops.py and test_sparse_weights.py."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsecc.ops  # noqa: F401  (registers the sparsecc:: ops)

ops = torch.ops.sparsecc
ROOT = Path(__file__).resolve().parents[1]
INDEX = torch.tensor([4, 1, 6])         # channels in no particular order; None means the first K
K = 3


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    monkeypatch.delenv("SPARSECC_TRITON", raising=False)


def channels(t, index, dim, k=K):
    return t.narrow(dim, 0, k) if index is None else t.index_select(dim, index)


@pytest.mark.parametrize("index", [None, INDEX], ids=["first_k", "index"])
@pytest.mark.parametrize("dim", ["in", "out"])
def test_channels_weight_grad(dim, index):
    g, x = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    full = g.t() @ x                                            # the whole weight gradient [out, in]
    expected = channels(full, index, 1 if dim == "in" else 0)
    torch.testing.assert_close(ops.channels_weight_grad(g, x, index, K, dim), expected)
    torch.library.opcheck(ops.channels_weight_grad.default, (g, x, index, K, dim))


def rows_case(dim, index):
    """(param [8, 7], the trained part's gradient, a maker of state like it) for channels of dim 0 or 1."""
    g = torch.Generator().manual_seed(3)
    param = torch.randn(8, 7, dtype=torch.float64, generator=g)
    part = channels(param, index, dim).shape
    return param, torch.randn(part, dtype=torch.float64, generator=g), \
        lambda: torch.rand(part, dtype=torch.float64, generator=g)


def torch_optim_on_the_channels(make_opt, param, grad, index, dim, state):
    """torch.optim run on a copy of the trained channels, with its state set to `state`; the full parameter with
    those channels replaced, and the new state."""
    part = torch.nn.Parameter(channels(param, index, dim).clone())
    part.grad = grad.clone()
    opt = make_opt([part])
    opt.state[part].update({k: v.clone() for k, v in state.items()})
    opt.step()
    out = param.clone()
    if index is None:
        out.narrow(dim, 0, part.shape[dim]).copy_(part.detach())
    else:
        out.index_copy_(dim, index, part.detach())
    return out, opt.state[part]


@pytest.mark.parametrize("index", [None, INDEX], ids=["first_k", "index"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.0, 0.0, False), (0.9, 0.01, False), (0.8, 0.0, True)])
def test_sgd_rows(dim, index, momentum, weight_decay, nesterov):
    param, grad, rand = rows_case(dim, index)
    buf = rand() if momentum else None
    expected, state = torch_optim_on_the_channels(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov),
        param, grad, index, dim, {} if buf is None else {"momentum_buffer": buf})

    def args():                 # fresh copies of what the op updates in place
        return (param.clone(), grad, index, K, dim, None if buf is None else buf.clone(),
                torch.tensor(0.1, dtype=torch.float64), momentum, weight_decay, nesterov)
    new = args()
    ops.sgd_rows(*new)
    torch.testing.assert_close(new[0], expected)
    if buf is not None:
        torch.testing.assert_close(new[5], state["momentum_buffer"])
    torch.library.opcheck(ops.sgd_rows.default, args())


@pytest.mark.parametrize("index", [None, INDEX], ids=["first_k", "index"])
@pytest.mark.parametrize("dim", [0, 1])
def test_adamw_rows(dim, index):
    param, grad, rand = rows_case(dim, index)
    exp_avg, exp_avg_sq = rand() - 0.5, rand()
    expected, state = torch_optim_on_the_channels(          # the 4th step, from a state after 3 steps
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        param, grad, index, dim, {"step": torch.tensor(3.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})

    def args():                 # fresh copies of what the op updates in place
        return (param.clone(), grad, index, K, dim, exp_avg.clone(), exp_avg_sq.clone(),
                torch.tensor(0.01, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64), 0.8, 0.95, 1e-6, 0.1)
    new = args()
    ops.adamw_rows(*new)
    torch.testing.assert_close(new[0], expected)
    torch.testing.assert_close(new[5], state["exp_avg"])
    torch.testing.assert_close(new[6], state["exp_avg_sq"])
    torch.library.opcheck(ops.adamw_rows.default, args())


def test_index_constant():
    out = ops.index_constant([5, 0, 2], torch.device("cpu"))
    assert out.dtype == torch.int64 and out.tolist() == [5, 0, 2]
    torch.library.opcheck(ops.index_constant.default, ([5, 0, 2], torch.device("cpu")))


@pytest.mark.parametrize("index,k,dim", [(None, -1, 0), (None, 2, 0), (torch.tensor([3, 0]), 2, 1)],
                         ids=["full", "first_2_rows", "columns_3_0"])
def test_linear_cross_entropy(index, k, dim):
    """(loss, d_h, d_weight, d_bias) against F.cross_entropy(F.linear(...)) and autograd; with k >= 0 the weight
    gradient of k channels of dim only."""
    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*shape, dtype=torch.float64, generator=g) for shape in ((6, 4), (5, 4), (5,)))
    target = torch.tensor([0, 4, -100, 2, 1, 3])             # one ignored row
    args = (h, w, b, target, "mean", -100, 0.1, None, 4, True, True, index, k, dim)   # chunks of 4 rows
    loss, d_h, d_w, d_b = ops.linear_cross_entropy(*args)
    hr, wr, br = (t.clone().requires_grad_() for t in (h, w, b))
    ref = F.cross_entropy(F.linear(hr, wr, br), target, ignore_index=-100, label_smoothing=0.1)
    ref.backward()
    expected_w = wr.grad if k < 0 else channels(wr.grad, index, dim, k)
    for got, want in [(loss, ref), (d_h, hr.grad), (d_w, expected_w), (d_b, br.grad)]:
        torch.testing.assert_close(got, want)
    torch.library.opcheck(ops.linear_cross_entropy.default, (h.clone().requires_grad_(), *args[1:]))


def test_every_custom_op_has_an_opcheck():
    """Each sparsecc:: op defined under sparsecc/ops is opchecked in some test file."""
    defined = {name for src in (ROOT / "sparsecc" / "ops").glob("*.py")
               for name in re.findall(r'custom_op\("sparsecc::(\w+)"', src.read_text())}
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    checked = set(re.findall(r"opcheck\(ops\.(\w+)", tests))
    assert len(defined) >= 13 and defined <= checked, sorted(defined - checked)
