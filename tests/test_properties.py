"""Property-based: Channels gradients equal the masked reference over random shapes, fractions and choices."""
import math

import torch
import torch.nn as nn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sparsecc
from conftest import expected_channels


class TwoLayer(nn.Module):
    def __init__(self, d_in, hidden, conv):
        super().__init__()
        self.conv = conv
        self.a = nn.Conv2d(d_in, hidden, 3, padding=1) if conv else nn.Linear(d_in, hidden)
        self.b = nn.Conv2d(hidden, 3, 1) if conv else nn.Linear(hidden, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d_in=st.integers(1, 9), hidden=st.integers(2, 13), batch=st.integers(1, 5), conv=st.booleans(),
       fraction=st.floats(0.05, 1.0), dim=st.sampled_from(["in", "out"]),
       select=st.sampled_from(["first", "magnitude"]), which=st.sampled_from(["a", "b"]))
@example(d_in=6, hidden=9, batch=3, conv=False, fraction=0.4, dim="in", select="magnitude", which="b")
@example(d_in=5, hidden=8, batch=2, conv=True, fraction=0.5, dim="out", select="magnitude", which="a")
def test_channels_gradient_is_the_masked_reference(d_in, hidden, batch, conv, fraction, dim, select, which):
    torch._dynamo.reset()
    torch.manual_seed(d_in * 100 + hidden)
    model = TwoLayer(d_in, hidden, conv)
    x = torch.randn(batch, d_in, 5, 4) if conv else torch.randn(batch, d_in)
    rule = sparsecc.Channels(fraction, dim=dim, select=select)
    scheme = sparsecc.UpdateScheme({f"{which}.weight": rule, "b.bias": "full"})
    weight = getattr(model, which).weight
    axis = 1 if dim == "in" else 0
    k = math.ceil(fraction * weight.shape[axis] - 1e-9)
    chosen = torch.tensor(expected_channels(weight, rule))      # worked out in the test, not by rule.indices
    assert len(chosen) == k
    if select == "magnitude":
        assert rule.indices(weight).tolist() == chosen.tolist()

    compiled = torch.compile(model, backend=sparsecc.backend(update=scheme, executor="eager"))
    compiled(x).square().sum().backward()
    got = weight.grad.clone()
    assert model.a.bias.grad is None                     # frozen by default
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    expected = torch.zeros_like(weight).index_copy(axis, chosen, weight.grad.index_select(axis, chosen))
    torch.testing.assert_close(got, expected)
