"""Bad input: a clear ValueError (sparsecc.ConfigError) that names the key, and nothing compiled or modified."""
import math

import pytest
import torch

import sparsecc
from models import make

C = sparsecc.Channels
US = sparsecc.UpdateScheme


def unchanged(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and \
        all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, math.nan, "half", True])
def test_channels_fraction_outside_unit_interval(fraction):
    with pytest.raises(sparsecc.ConfigError, match="fraction"):
        C(fraction)


def test_channels_dim_and_select_suggest_the_valid_word():
    with pytest.raises(sparsecc.ConfigError, match="'in' or 'out'.*Did you mean: 'out'"):
        C(0.5, dim="ou")
    with pytest.raises(sparsecc.ConfigError, match="Did you mean: 'magnitude'"):
        C(0.5, select="magnitud")


def test_rule_word_is_checked():
    with pytest.raises(sparsecc.ConfigError, match="'fc1.weight'.*Did you mean: 'full'"):
        US({"fc1.weight": "ful"})
    with pytest.raises(sparsecc.ConfigError, match="default"):
        US({}, default="train")


def test_config_error_is_a_value_error():
    assert issubclass(sparsecc.ConfigError, ValueError)


def test_pattern_matching_no_parameter_suggests_names():
    model, (x,) = make("mlp")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sparsecc.ConfigError, match=r"'fc4\.weight' matches no parameter.*'fc1\.weight'"):
        sparsecc.explain(model, x, update=US({"fc4.weight": "full"}))
    assert unchanged(model, state)


def test_pattern_matching_no_parameter_through_torch_compile():
    """torch.compile wraps backend errors in BackendCompilerFailed; the cause is sparsecc's own error."""
    model, (x,) = make("mlp")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="sparsecc", options={"update": US({"fc3.wieght": "full"})})
    with pytest.raises(Exception, match=r"'fc3\.wieght' matches no parameter.*'fc3\.weight'") as info:
        compiled(x)
    assert isinstance(info.value.inner_exception, sparsecc.ConfigError)
    assert unchanged(model, state)


def test_channels_on_a_bias():
    model, (x,) = make("mlp")
    with pytest.raises(sparsecc.ConfigError, match=r"'fc1\.bias'.*1-D"):
        sparsecc.explain(model, x, update=US({"fc1.bias": C(0.5)}))


def test_scheme_that_trains_nothing():
    model, (x,) = make("mlp")
    with pytest.raises(sparsecc.ConfigError, match="trains nothing"):
        sparsecc.explain(model, x, update=US({"fc1.*": "frozen"}))


def test_tied_parameters_with_conflicting_rules():
    model, (ids,) = make("transformer")
    with pytest.raises(sparsecc.ConfigError, match=r"tied parameters \['embed.weight', 'head.weight'\]"):
        sparsecc.explain(model, ids, update=US({"head.weight": "full", "embed.weight": C(0.5)}))


def test_unknown_option_lists_valid_ones():
    with pytest.raises(sparsecc.ConfigError, match=r"unknown sparsecc option 'updte'.*\['update', 'executor', 'sparsity', 'cost_model', 'fuse_loss', 'memory_budget'\].*Did you mean: 'update'"):
        sparsecc.backend(updte=US.full())
    with pytest.raises(sparsecc.ConfigError, match="'executor'.*Did you mean: 'eager'"):
        sparsecc.backend(executor="eagr")
    with pytest.raises(sparsecc.ConfigError, match=r"memory_budget '40 MBs' is not a size"):
        sparsecc.backend(memory_budget="40 MBs")
    model, (x,) = make("mlp")
    with pytest.raises(sparsecc.ConfigError, match="unknown sparsecc option 'exector'"):
        sparsecc.explain(model, x, exector="eager")
    with pytest.raises(Exception, match="unknown sparsecc option 'exector'"):
        torch.compile(model, backend="sparsecc", options={"exector": "eager"})(x)


def test_update_must_be_a_scheme():
    with pytest.raises(sparsecc.ConfigError, match="UpdateScheme"):
        sparsecc.backend(update={"fc1.weight": "full"})
