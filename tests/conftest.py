import copy

import pytest
import torch
from hypothesis import settings

import sparsecc

# The same examples on every run: CI must not pass or fail by the draw.
settings.register_profile("sparsecc", derandomize=True)
settings.load_profile("sparsecc")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (Dynamo's cache would otherwise hit its recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def loss_of(out):
    """A loss whose gradient depends on the output (a plain sum would give constant tangents)."""
    return logits(out).float().square().mean()


def channel_mask(p, rule):
    """True on the channels a Channels rule trains, broadcast to p's shape."""
    keep = torch.zeros(p.shape[rule.axis], dtype=torch.bool)
    idx = rule.indices(p)
    keep[idx if idx is not None else slice(0, rule.count(p.shape[rule.axis]))] = True
    shape = [1] * p.dim()
    shape[rule.axis] = -1
    return keep.view(shape).expand_as(p)


def reference_grads(model, inputs, scheme):
    """ARCHITECTURE.md's reference: eager full backward; frozen -> None; Channels -> zero outside the slice."""
    model.zero_grad(set_to_none=True)
    loss = loss_of(model(*inputs))
    loss.backward()
    rules = scheme.resolve(dict(model.named_parameters()))
    grads = {}
    for name, p in model.named_parameters():
        rule = rules[name]
        if rule == "frozen":
            grads[name] = None
            continue
        grads[name] = p.grad * channel_mask(p, rule) if isinstance(rule, sparsecc.Channels) else p.grad.clone()
    return loss.detach(), grads


def compiled_grads(model, inputs, scheme, executor):
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend=sparsecc.backend(update=scheme, executor=executor))
    loss = loss_of(compiled(*inputs))
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_matches_reference(model, inputs, scheme, executor):
    ref_model = copy.deepcopy(model)
    ref_loss, ref = reference_grads(ref_model, inputs, scheme)
    loss, got = compiled_grads(model, inputs, scheme, executor)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        if ref[name] is None:
            assert got[name] is None, f"{name} is frozen but got a gradient"
        else:
            assert got[name] is not None, f"{name} is trained but got no gradient"
            torch.testing.assert_close(got[name], ref[name], msg=lambda m: f"{name}: {m}")
    for (name, b), (_, rb) in zip(model.named_buffers(), ref_model.named_buffers()):
        torch.testing.assert_close(b, rb, msg=lambda m: f"buffer {name}: {m}")
