"""sparsecc:: block-sparse ops against a dense masked reference: opcheck, float64 gradcheck, random shapes."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.ops.block_sparse import from_blocks, to_blocks
from sparsecc.sparsity import Blocks

ops = torch.ops.sparsecc


def sample(out_blocks, in_blocks, b, density, n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_blocks * b, in_blocks * b, generator=gen, dtype=dtype)
    mask = Blocks(b, density).mask(w)
    values, rows, cols = to_blocks(w * mask, mask, b)
    x = torch.randn(n, in_blocks * b, generator=gen, dtype=dtype)
    return w * mask, mask, values, rows, cols, x


def test_opcheck_every_op():
    dense, _, values, rows, cols, x = sample(3, 4, 8, 0.4, 5)
    g = torch.randn(5, 24)
    torch.library.opcheck(ops.block_sparse_mm, (x.requires_grad_(), values.requires_grad_(), rows, cols, 24))
    torch.library.opcheck(ops.block_sparse_mm_t, (g, values.detach(), rows, cols, 32))
    torch.library.opcheck(ops.block_sddmm, (g, x.detach(), rows, cols, 8))


def test_gradcheck_float64():
    _, _, values, rows, cols, x = sample(2, 3, 4, 0.5, 3, dtype=torch.float64)
    x.requires_grad_()
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, v: ops.block_sparse_mm(a, v, rows, cols, 8), (x, values))


@settings(max_examples=25, deadline=None)
@given(b=st.sampled_from([8, 16, 32, 64]), ob=st.integers(1, 3), ib=st.integers(1, 3),
       density=st.floats(0.05, 1.0), n=st.integers(1, 13), seed=st.integers(0, 999))
def test_matches_dense_masked_reference_forward_and_backward(b, ob, ib, density, n, seed):
    """In float64, so that summation order (blocks vs one dense GEMM) cannot matter at default tolerances."""
    dense, mask, values, rows, cols, x = sample(ob, ib, b, density, n, dtype=torch.float64, seed=seed)
    assert torch.equal(from_blocks(values, rows, cols, dense.shape), dense)
    x.requires_grad_()
    values.requires_grad_()
    y = ops.block_sparse_mm(x, values, rows, cols, ob * b)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    wr = dense.clone().requires_grad_()
    yr = xr @ wr.T
    yr.backward(g)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    # the weight gradient exists only at the kept blocks and equals the dense gradient there
    torch.testing.assert_close(from_blocks(values.grad, rows, cols, dense.shape), wr.grad * mask)
