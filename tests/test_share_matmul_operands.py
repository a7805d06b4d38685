"""share_matmul_operands: a value an mm reads through a reshape becomes the one buffer all its readers read.

Its effect on Inductor's CUDA plan (no float32 copy of a bf16 Llama's residual gradient) is checked where that plan is
generated: test_memory_passes.py::test_the_walker_follows_the_cuda_wrappers_inductor_generates_for_a_training_step.
"""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sparsecc.passes.share_matmul_operands import share_matmul_operands

aten = torch.ops.aten


def _norm_backward_like(h, w, r, *, returned=False, written=False):
    """A residual gradient (float32 math rounded to bfloat16) read by an mm as 2-D, by a transposed mm (the weight
    gradient), and by the residual add."""
    g32 = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    g = g32.to(torch.bfloat16)
    v = g.view(-1, h.shape[-1])
    d_in = v @ w
    d_w = v.t() @ h.view(-1, h.shape[-1])
    if written:
        g.mul_(2)
    out = (g + r, d_in, d_w)
    return (*out, g) if returned else out


def _inputs():
    torch.manual_seed(0)
    return (torch.randn(2, 6, 8, dtype=torch.bfloat16), torch.randn(8, 5, dtype=torch.bfloat16),
            torch.randn(2, 6, 8, dtype=torch.bfloat16))


def _the_rounded_gradient(gm):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.meta["val"].dtype == torch.bfloat16
                and any(u.target is aten.view.default and len(u.users) > 1 for u in n.users))


def test_every_reader_of_the_value_reads_the_mm_operand_and_the_results_do_not_change():
    args = _inputs()
    gm = make_fx(lambda h, w, r: _norm_backward_like(h, w, r))(*args)
    expected = gm(*args)
    g = _the_rounded_gradient(gm)
    assert len(g.users) == 2                        # the 2-D view for the mms, and the residual add

    result = share_matmul_operands(gm, None)

    assert result.counts["operands_shared"] == 1 and g.name in result.notes[0]
    (v,) = g.users                                  # the mm operand is the value's only reader ...
    assert v.target is aten.view.default and {u.target for u in v.users} >= {aten.mm.default}
    back = next(u for u in v.users if u.target is aten.view.default)
    assert list(back.args[1]) == [2, 6, 8]          # ... and the add reads it, shaped back
    assert {u.target for u in back.users} == {aten.add.Tensor}
    gm.graph.lint()
    for got, want in zip(gm(*args), expected):
        assert torch.equal(got, want)


def test_a_returned_or_written_value_is_left_alone():
    args = _inputs()
    for kwargs in ({"returned": True}, {"written": True}):
        gm = make_fx(lambda h, w, r: _norm_backward_like(h, w, r, **kwargs))(*args)
        before = gm.code
        assert share_matmul_operands(gm, None).counts["operands_shared"] == 0, kwargs
        assert gm.code == before, kwargs


def test_a_view_only_an_mm_reads_is_not_a_copy_and_is_left_alone():
    """With one reader the view of an mm operand is lowered by realizing its base (no copy): nothing to do."""
    def f(h, w, r):
        g = (h.float() * 2).to(torch.bfloat16)
        return g.view(-1, 8) @ w, g + r
    args = _inputs()
    gm = make_fx(f)(*args)
    assert share_matmul_operands(gm, None).counts["operands_shared"] == 0
