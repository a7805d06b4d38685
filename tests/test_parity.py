"""Loss, every .grad and BatchNorm running statistics equal the eager reference of ARCHITECTURE.md."""
import pytest

import sparsecc
from conftest import assert_matches_reference
from models import make

C = sparsecc.Channels
US = sparsecc.UpdateScheme

SCHEMES = {
    "mlp": {
        "full": US.full(),
        "bias_only": US({"*.bias": "full"}),
        "last_k": US({"fc3.*": "full", "fc2.*": "full"}),
        "channels_in": US({"fc2.weight": C(0.25), "fc3.*": "full"}),
        "channels_out": US({"fc2.weight": C(0.5, dim="out"), "fc2.bias": "full"}),
        "channels_magnitude": US({"fc1.weight": C(0.3, select="magnitude"), "fc3.weight": C(0.5, dim="out", select="magnitude")}),
    },
    "convnet": {
        "full": US.full(),
        "bias_only": US({"*.bias": "full", "bn*": "full"}),
        "last_k": US({"pw.*": "full", "bn3.*": "full", "head.*": "full"}),
        "channels_in": US({"pw.weight": C(0.25), "stem.weight": C(0.5), "head.*": "full"}),
        "channels_out": US({"pw.weight": C(0.5, dim="out"), "dw.weight": C(0.5, dim="out"), "bn2.*": "full"}),
        "channels_magnitude": US({"pw.weight": C(0.25, select="magnitude"), "dw.weight": C(0.4, dim="out", select="magnitude")}),
    },
    "transformer": {
        "full": US.full(),
        "bias_only": US({"blocks.*.bias": "full"}),
        "last_k": US({"blocks.2.*": "full", "ln_f.*": "full"}),
        "channels_in": US({"blocks.*.mlp.fc1.weight": C(0.25), "blocks.*.attn.q.weight": C(0.5)}),
        "channels_out": US({"blocks.2.mlp.fc2.weight": C(0.5, dim="out"), "embed.weight": C(0.25)}),
        "channels_magnitude": US({"blocks.1.attn.v.weight": C(0.25, select="magnitude"), "blocks.2.mlp.*": "full"}),
        "pockengine": US({"blocks.1.*.bias": "full", "blocks.2.*.bias": "full", "blocks.2.mlp.fc1.weight": C(0.25),
                          "blocks.2.mlp.fc2.weight": C(0.25), "blocks.2.attn.proj.weight": C(0.5, dim="out"),
                          "ln_f.*": "full"}),
    },
    "llama": {
        "full": US.full(),
        "norms_only": US({"*norm.weight": "full"}),
        "last_k": US({"model.layers.1.*": "full", "lm_head.weight": "full"}),
        "channels_in": US({"model.layers.*.mlp.down_proj.weight": C(0.25), "model.layers.1.self_attn.o_proj.weight": C(0.5)}),
        "channels_out": US({"model.layers.1.mlp.up_proj.weight": C(0.5, dim="out"), "model.norm.weight": "full"}),
        "pockengine": US({"model.layers.1.*norm.weight": "full", "model.layers.1.mlp.*_proj.weight": C(0.25),
                          "lm_head.weight": C(0.5, select="magnitude")}),
    },
}
CASES = [(m, s) for m, schemes in SCHEMES.items() for s in schemes]
INDUCTOR_CASES = [("mlp", "channels_magnitude"), ("convnet", "channels_in"), ("convnet", "bias_only"),
                  ("transformer", "pockengine"), ("llama", "pockengine")]


# the llama cases (3 s each) run in the quick loop (`-m "not slow"`) through their pockengine scheme only
@pytest.mark.parametrize("model_name,scheme_name",
                         [c if c[0] != "llama" or c[1] == "pockengine" else pytest.param(*c, marks=pytest.mark.slow)
                          for c in CASES])
def test_eager_executor_matches_reference(model_name, scheme_name):
    model, inputs = make(model_name)
    assert_matches_reference(model, inputs, SCHEMES[model_name][scheme_name], "eager")


@pytest.mark.parametrize("model_name,scheme_name", [c if c[0] == "mlp" else pytest.param(*c, marks=pytest.mark.slow)
                                                     for c in INDUCTOR_CASES])    # Inductor compiles: ~10 s each
def test_inductor_executor_matches_reference(model_name, scheme_name):
    model, inputs = make(model_name)
    assert_matches_reference(model, inputs, SCHEMES[model_name][scheme_name], "inductor")


def test_torch_optimizer_trains_only_the_scheme():
    """After the compiled backward, a plain torch.optim step changes exactly what the scheme trains."""
    import torch
    from conftest import loss_of
    model, (ids,) = make("transformer")
    scheme = SCHEMES["transformer"]["pockengine"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compiled = torch.compile(model, backend=sparsecc.backend(update=scheme, executor="eager"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss_of(compiled(ids)).backward()
        opt.step()
    rules = scheme.resolve(dict(model.named_parameters()))
    for name, p in model.named_parameters():
        changed = (p.detach() != before[name])
        rule = rules[name]
        if rule == "frozen":
            assert not changed.any(), name
        elif isinstance(rule, sparsecc.Channels):
            k = rule.count(p.shape[rule.axis])
            assert not changed.narrow(rule.axis, k, p.shape[rule.axis] - k).any(), name
            assert changed.narrow(rule.axis, 0, k).any(), name
        else:
            assert changed.any(), name


def test_dynamic_shapes_recompile_and_stay_exact():
    """A new sequence length makes Dynamo recompile with a symbolic size; gradients stay exact."""
    import copy

    import torch
    from conftest import reference_grads, loss_of
    model, _ = make("transformer")
    scheme = US({"blocks.2.mlp.fc1.weight": C(0.25), "blocks.*.bias": "full"})
    compiled = torch.compile(model, backend=sparsecc.backend(update=scheme, executor="eager"))
    for t in (16, 12, 9):
        ids = torch.randint(0, 40, (2, t))
        _, ref = reference_grads(copy.deepcopy(model), (ids,), scheme)
        model.zero_grad(set_to_none=True)
        loss_of(compiled(ids)).backward()
        for name, p in model.named_parameters():
            if ref[name] is None:
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, ref[name], msg=lambda m: f"{name} (t={t}): {m}")
    assert any("Sym(" in r.graphs["forward/after"] for r in sparsecc.reports()[-2:])
