"""fuse_linear_cross_entropy: the output projection and its loss chunked over tokens.

The fused step equals eager PyTorch (float64, to 1e-10) for every form of the loss the pass accepts, the
full logits never exist in the compiled graph, a frozen head computes no weight gradient, and on the
transformers models of test_real_models the fused step equals the unfused one (float32: losses to 1e-6,
one SGD step's parameters to 1e-5 relative — the chunks are summed in another order).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
from conftest import channel_mask

C, US = sparsecc.Channels, sparsecc.UpdateScheme
VOCAB, D, BATCH, SEQ = 96, 16, 3, 10


class TinyLM(nn.Module):
    """Embedding, one nonlinear layer and a head: logits [B, T, V] with V much larger than D."""

    def __init__(self, bias=True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB, bias=bias)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def shifted(upcast=False, **kwargs):
    def loss_fn(logits, y):
        logits = logits.float() if upcast else logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), **kwargs)
    return loss_fn


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    y = ids.clone()
    y[0, 4:7] = -100                       # ignored positions
    y[2, 2] = 5
    return ids, y


def sgd_reference(model, x, y, loss_fn, scheme, lr=0.5):
    """One eager SGD step on the reference gradients (frozen: none; Channels: masked)."""
    rules = scheme.resolve(dict(model.named_parameters()))
    loss = loss_fn(model(x), y)
    loss.backward()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if rules[n] == "frozen":
                continue
            g = p.grad * channel_mask(p, rules[n]) if isinstance(rules[n], C) else p.grad
            p -= lr * g
    return loss.detach()


LOSSES = {
    "mean": shifted(),
    "sum": shifted(reduction="sum"),
    "ignore_index_7": shifted(ignore_index=7),
    "label_smoothing": shifted(label_smoothing=0.1),
    "smoothing_sum_upcast": shifted(upcast=True, reduction="sum", label_smoothing=0.2),
}
HEADS = {"full": US({"head.*": "full", "mix.bias": "full"}),
         "frozen": US({"mix.*": "full"}),
         "channels_in": US({"head.weight": C(0.5), "mix.weight": C(0.25)}),
         "channels_out_magnitude": US({"head.weight": C(0.25, dim="out", select="magnitude"), "head.bias": "full"})}


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("head", HEADS)
def test_fused_step_equals_eager(loss_name, head):
    torch.manual_seed(0)
    model = TinyLM().double()
    x, y = batch()
    if loss_name == "ignore_index_7":
        y = y.masked_fill(y == -100, 7)
    ref = copy.deepcopy(model)
    ref_loss = sgd_reference(ref, x, y, LOSSES[loss_name], HEADS[head])
    step = sparsecc.compile_train_step(model, LOSSES[loss_name], optimizer=sparsecc.SGD(lr=0.5), update=HEADS[head],
                                       example_inputs=(x, y), executor="eager")
    loss = step(x, y)
    assert step.report.stats["losses_fused"] == 1
    # .float() of float64 logits rounds them to float32, where the chunked sums differ in the last bits
    tol = {"rtol": 1e-5, "atol": 1e-7} if "upcast" in loss_name else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), **tol)
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, r, **tol, msg=lambda m: f"{n}: {m}")


def _shapes(gm):
    return {tuple(n.meta["val"].shape) for n in gm.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor)}


def test_no_full_logits_and_no_weight_gradient_for_a_frozen_head():
    torch.manual_seed(0)
    model = TinyLM()
    x, y = batch()
    n = BATCH * (SEQ - 1)
    fused = sparsecc.compile_train_step(model, shifted(), optimizer=sparsecc.SGD(lr=0.1), update=HEADS["frozen"],
                                        example_inputs=(x, y), executor="eager")
    plain = sparsecc.compile_train_step(copy.deepcopy(model), shifted(), optimizer=sparsecc.SGD(lr=0.1),
                                        update=HEADS["frozen"], example_inputs=(x, y), executor="eager",
                                        fuse_loss=False)
    full = {(BATCH, SEQ, VOCAB), (BATCH, SEQ - 1, VOCAB), (n, VOCAB)}
    assert full & _shapes(plain.graph), "the unfused step should hold full logits (the test's premise)"
    assert not full & _shapes(fused.graph), sorted(full & _shapes(fused.graph))
    (op,) = fused.graph.graph.find_nodes(op="call_function", target=torch.ops.sparsecc.linear_cross_entropy.default)
    chunk, input_grad, weight_grad = op.args[8:11]
    assert chunk == fused.report.passes[0].counts["chunk_rows"] and 1 <= chunk < n
    assert input_grad and not weight_grad          # mix.* trains below the head; the head is frozen
    assert not any(tuple(node.meta["val"].shape) == (VOCAB, D) for node in fused.graph.graph.nodes
                   if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor))
    assert fused.report.stats["peak_bytes_estimate"] < plain.report.stats["peak_bytes_estimate"]


def test_unfusable_losses_are_left_alone_with_a_reason():
    torch.manual_seed(0)
    model = TinyLM()
    x, y = batch()
    weighted = shifted(weight=torch.rand(VOCAB))
    step = sparsecc.compile_train_step(model, weighted, optimizer=sparsecc.SGD(lr=0.1), update=HEADS["full"],
                                       example_inputs=(x, y), executor="eager")
    assert step.report.stats["losses_fused"] == 0
    assert any("class weights" in note for note in step.report.passes[0].notes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-plain", "llama-labels", "gpt2-plain", "gpt2-tuple", "bert-classifier",
                                  "vit"])
def test_fused_equals_unfused_on_transformers_models(name):
    from test_real_models import case
    results = []
    for fuse in (False, True):
        torch._dynamo.reset()
        model, x, y, loss_fn, scheme = case(name)
        example = (x,) if y is None else (x, y)
        step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(lr=0.5), update=scheme,
                                           example_inputs=example, executor="eager", fuse_loss=fuse)
        results.append((step(*example), dict(model.named_parameters()), step.report.stats["losses_fused"]))
    (loss0, params0, _), (loss1, params1, fused) = results
    assert fused == (1 if name.startswith(("llama", "gpt2")) else 0)     # classifiers: tiny logits, not fused
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for n in params0:
        torch.testing.assert_close(params1[n], params0[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_the_op_holds_one_chunk_of_logits_at_a_time():
    """Measured (profiler) peak of the op's own kernel: its outputs plus the workspace the memory model charges
    (one [chunk, vocab] buffer, beside which the hidden-state gradient's pieces grow), not a second chunk's logits
    beside it (that would be 256 KB more)."""
    from sparsecc.memory import measure_peak
    from sparsecc.ops.linear_cross_entropy import workspace_bytes
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 16, generator=g), torch.randn(4096, 16, generator=g)
    target = torch.randint(0, 4096, (64,), generator=g)
    call = lambda: torch.ops.sparsecc.linear_cross_entropy(h, w, None, target, "mean", -100, 0.0, None, 16, True,  # noqa: E731
                                                           True)
    outputs = h.numel() * 4 + w.numel() * 4
    chunk = 16 * 4096 * 4
    assert workspace_bytes(h, w, None, 16, True) == chunk        # the chunk outweighs the pieces (4 KB) here
    assert abs(measure_peak(call) - (outputs + chunk)) <= 4096


def test_in_bfloat16_on_the_cpu_the_op_makes_no_float32_copy_and_the_memory_model_measures_it():
    """scatter_add_ on a CPU bfloat16 tensor allocates a float32 copy of it: the op adds each row's target entry
    with index_put_ instead (a float32 copy of a chunk would be 256 KB more here). oneDNN's bfloat16 matmul copies
    an operand, which the formula does not know: there the memory model measures the op's workspace."""
    from sparsecc.memory import kernel_workspace, measure_peak
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(128, 8, generator=g).bfloat16(), torch.randn(4096, 8, generator=g).bfloat16()
    target = torch.randint(0, 4096, (128,), generator=g)
    args = (h, w, None, target, "mean", -100, 0.0, None, 64, True, False)     # the hidden states' gradient
    op = torch.ops.sparsecc.linear_cross_entropy.default
    workspace = measure_peak(lambda: op(*args)) - h.numel() * 2
    chunk = 64 * 4096 * 2

    def extra(fn):             # what oneDNN's bf16 kernels hold beyond their result (this CPU's, measured)
        out = []
        return measure_peak(lambda: out.append(fn())) - out[0].numel() * 2
    grads = torch.randn(64, 4096, generator=g).bfloat16()
    kernels = max(extra(lambda: grads @ w), extra(lambda: torch.nn.functional.linear(h[:64], w)))
    # one chunk of logits and the kernels' own copies; a float32 copy of the chunk would add 2 * chunk
    assert chunk <= workspace <= chunk + kernels + 4096, (workspace, kernels)
    assert abs(kernel_workspace(op, args, {}, h.device) - workspace) <= 4096
