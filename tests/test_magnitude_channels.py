"""Channels(select="magnitude") against channels chosen by hand: weights whose channel norms are set in the test,
the expected channels written out, and the trained gradient compared with eager autograd on those channels."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc

UNIT = torch.tensor([2 / 3, -2 / 3, 1 / 3])        # norm 1


def weight_with_column_norms(norms) -> torch.Tensor:
    """A [3, len(norms)] weight whose column j has L2 norm norms[j] (every entry nonzero)."""
    return torch.stack([n * UNIT.roll(j) for j, n in enumerate(norms)], dim=1)


def weight_with_row_norms(norms) -> torch.Tensor:
    return weight_with_column_norms(norms).t().contiguous()


@pytest.mark.parametrize("fraction,expected", [(0.2, [1]), (0.4, [1, 3]), (0.6, [1, 3, 4]), (1.0, [0, 1, 2, 3, 4])])
def test_input_channels_of_largest_norm(fraction, expected):
    w = weight_with_column_norms([1.0, 5.0, 2.0, 4.0, 3.0])
    assert sparsecc.Channels(fraction, dim="in", select="magnitude").indices(w).tolist() == expected


@pytest.mark.parametrize("fraction,expected", [(0.25, [2]), (0.5, [0, 2]), (0.75, [0, 2, 3])])
def test_output_channels_of_largest_norm(fraction, expected):
    w = weight_with_row_norms([3.0, 0.5, 7.0, 2.0])
    assert sparsecc.Channels(fraction, dim="out", select="magnitude").indices(w).tolist() == expected


def test_conv_channels_use_the_norm_over_the_whole_filter():
    """Output channel 1 has the smallest entries but the most of them nonzero: the norm, not the max, decides."""
    w = torch.zeros(3, 2, 2, 2)
    w[0, 0, 0, 0] = 2.0                 # norm 2
    w[1] = 1.5                          # norm 1.5 * sqrt(8) = 4.24
    w[2, 1, 1, 1] = 3.0                 # norm 3
    assert sparsecc.Channels(0.34, dim="out", select="magnitude").indices(w).tolist() == [1, 2]


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 3, bias=False), nn.Linear(3, 2)
        with torch.no_grad():
            self.a.weight.copy_(weight_with_column_norms([1.0, 5.0, 2.0, 4.0, 3.0]))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


SCHEME = sparsecc.UpdateScheme({"a.weight": sparsecc.Channels(0.4, dim="in", select="magnitude")})
TRAINED = [1, 3]                        # the columns of norm 5 and 4


def test_backend_trains_exactly_the_hand_chosen_channels():
    torch.manual_seed(0)
    model, x = Two(), torch.randn(4, 5)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=sparsecc.backend(update=SCHEME, executor="eager"))
    compiled(x).square().sum().backward()
    ref(x).square().sum().backward()
    expected = torch.zeros_like(ref.a.weight.grad)
    expected[:, TRAINED] = ref.a.weight.grad[:, TRAINED]
    assert (ref.a.weight.grad[:, TRAINED] != 0).all()
    torch.testing.assert_close(model.a.weight.grad, expected)


def test_train_step_updates_exactly_the_hand_chosen_channels():
    torch.manual_seed(0)
    model, x, y = Two(), torch.randn(4, 5), torch.randn(4, 2)
    ref = copy.deepcopy(model)
    step = sparsecc.compile_train_step(model, F.mse_loss, optimizer=sparsecc.SGD(lr=0.5), update=SCHEME,
                                       example_inputs=(x, y), executor="eager")
    step(x, y)
    F.mse_loss(ref(x), y).backward()
    expected = ref.a.weight.detach().clone()
    expected[:, TRAINED] -= 0.5 * ref.a.weight.grad[:, TRAINED]
    torch.testing.assert_close(model.a.weight.detach(), expected)
    assert step.state_dict()["channels"]["a.weight"].tolist() == TRAINED
