"""compile_train_step: K steps equal K steps of torch.optim on the reference gradients, frozen parts restored."""
import copy

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from conftest import channel_mask
from models import make

C = sparsecc.Channels
US = sparsecc.UpdateScheme


def data(model_name):
    """(x, y, loss_fn) for a model."""
    model, (x,) = make(model_name)
    g = torch.Generator().manual_seed(1)
    if model_name == "mlp":
        return x, torch.randn(x.shape[0], 6, generator=g), lambda out, y: F.mse_loss(out, y)
    if model_name == "convnet":
        return x, torch.randint(0, 5, (x.shape[0],), generator=g), F.cross_entropy
    return x, torch.randint(0, 40, x.shape, generator=g), lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())


SCHEMES = {
    "mlp": {"full": US.full(), "bias_only": US({"*.bias": "full"}),
            "channels": US({"fc2.weight": C(0.25), "fc1.weight": C(0.5, dim="out", select="magnitude")}),
            "mixed": US({"fc1.bias": "full", "fc2.weight": C(0.25), "fc3.*": "full"})},
    # pw.bias feeds a BatchNorm, so its true gradient is 0: Adam would only normalise rounding noise
    "convnet": {"full": US.full(), "bias_only": US({"bn*.bias": "full", "head.bias": "full"}),
                "channels": US({"pw.weight": C(0.25), "stem.weight": C(0.5, dim="out")}),
                "mixed": US({"bn3.*": "full", "pw.weight": C(0.5, select="magnitude"), "head.*": "full"})},
    # attention's key bias shifts every logit of a query equally: its true gradient is 0 too
    "transformer": {"full": US.full(), "bias_only": US({"blocks.*.k.bias": "frozen", "blocks.*.bias": "full"}),
                    "channels": US({"blocks.*.mlp.fc1.weight": C(0.25), "blocks.2.attn.proj.weight": C(0.5, dim="out")}),
                    "mixed": US({"blocks.*.k.bias": "frozen", "blocks.2.*.bias": "full", "blocks.2.mlp.fc2.weight": C(0.25), "ln_f.*": "full",
                                 "blocks.1.attn.v.weight": C(0.25, select="magnitude")})},
}
OPTIMIZERS = {
    "sgd": (sparsecc.SGD(lr=0.05), lambda ps: torch.optim.SGD(ps, lr=0.05)),
    "sgd_momentum_wd": (sparsecc.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
                        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "sgd_nesterov": (sparsecc.SGD(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.001),
                     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.001)),
    "adamw": (sparsecc.AdamW(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
}


def reference_steps(model, x, y, loss_fn, scheme, make_opt, k, masks=None):
    """torch.optim on the reference gradients (masked by a sparse weight's mask); after each step every
    frozen part is put back."""
    rules = scheme.resolve(dict(model.named_parameters()))
    trained = [p for n, p in model.named_parameters() if rules[n] != "frozen"]
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    keep = {n: channel_mask(p, rules[n]) for n, p in model.named_parameters() if isinstance(rules[n], sparsecc.Channels)}
    opt = make_opt(trained)
    losses = []
    for _ in range(k):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        for n, p in model.named_parameters():
            if n in keep:
                p.grad *= keep[n]
            if masks and n in masks and p.grad is not None:
                p.grad *= masks[n]
        opt.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in keep:
                    p.copy_(torch.where(keep[n], p, original[n]))
        losses.append(loss.detach())
    return losses


def run_and_compare(model_name, scheme_name, opt_name, executor, k=3):
    model, _ = make(model_name)
    x, y, loss_fn = data(model_name)
    scheme = SCHEMES[model_name][scheme_name]
    ours, theirs = OPTIMIZERS[opt_name]
    ref = copy.deepcopy(model)
    ref_losses = reference_steps(ref, x, y, loss_fn, scheme, theirs, k)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=ours, update=scheme, example_inputs=(x, y),
                                       executor=executor)
    losses = [step(x, y) for _ in range(k)]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses))
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    return step


CASES = [(m, s, o) for m in SCHEMES for s, o in zip(SCHEMES[m], ["sgd_momentum_wd", "adamw", "sgd_nesterov", "sgd"])]
CASES += [("transformer", "mixed", "adamw"), ("convnet", "channels", "adamw"), ("mlp", "channels", "sgd_momentum_wd")]


# the transformer cases are the slow ones (5-7 s each): one stays in the quick loop (`-m "not slow"`)
FAST_TRANSFORMER_CASE = ("transformer", "mixed", "adamw")


@pytest.mark.parametrize("model_name,scheme_name,opt_name",
                         [c if c[0] != "transformer" or c == FAST_TRANSFORMER_CASE else pytest.param(*c, marks=pytest.mark.slow)
                          for c in CASES])
def test_k_steps_match_torch_optim(model_name, scheme_name, opt_name):
    run_and_compare(model_name, scheme_name, opt_name, "eager")


@pytest.mark.slow      # Inductor compiles each whole step (~30 s each on 2 cores)
@pytest.mark.parametrize("model_name,scheme_name,opt_name", [("transformer", "mixed", "adamw"),
                                                             ("convnet", "mixed", "sgd_momentum_wd")])
def test_k_steps_match_torch_optim_inductor(model_name, scheme_name, opt_name):
    run_and_compare(model_name, scheme_name, opt_name, "inductor")


@pytest.mark.parametrize("opt_name", [pytest.param("adamw", marks=pytest.mark.slow), "sgd_momentum_wd"])
def test_sparse_weights_train_on_the_sparse_kernels_and_keep_their_pattern(opt_name):
    """A sparsified model trains on the sparse ops in the one-graph step (cost model off: every call), and K
    steps equal torch.optim on the masked gradients; pruned entries stay exactly zero (weight decay and
    momentum included)."""
    model, _ = make("transformer")
    x, y, loss_fn = data("transformer")
    sparsecc.sparsify(model, sparsecc.Sparsity({"blocks.*.mlp.fc1.weight": sparsecc.Blocks(8, 0.5),
                                                "blocks.*.attn.q.weight": sparsecc.NM(2, 4),
                                                "blocks.*.mlp.fc2.weight": sparsecc.Unstructured(0.3)}))
    scheme = US({"blocks.*.k.bias": "frozen", "blocks.*.mlp.*": "full", "blocks.*.attn.q.*": "full", "ln_f.*": "full"})
    ours, theirs = OPTIMIZERS[opt_name]
    ref = copy.deepcopy(model)
    ref_losses = reference_steps(ref, x, y, loss_fn, scheme, theirs, 3, masks=model.sparsecc_masks)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=ours, update=scheme, example_inputs=(x, y),
                                       executor="eager", cost_model="off")
    ops = [n.target for n in step.graph.graph.nodes if n.op == "call_function"]
    layers = len(model.blocks)
    for op in ("block_sparse_mm", "nm_mm", "csr_mm"):           # forward: one call per sparse weight
        assert ops.count(getattr(torch.ops.sparsecc, op).default) == layers, op
    assert step.report.stats["sparse_ops"] == 3 * layers
    torch.testing.assert_close(torch.stack([step(x, y) for _ in range(3)]), torch.stack(ref_losses))
    # Adam divides by the gradient's own magnitude: an entry whose gradient is ~1e-7 moves by ~lr either way,
    # so rounding differences of that size reach 1e-5 on a handful of entries
    tol = {"rtol": 1e-3, "atol": 1e-4} if opt_name == "adamw" else {}
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    for name, mask in model.sparsecc_masks.items():
        assert model.get_parameter(name)[~mask].abs().max() == 0, name


def test_optimizer_state_only_for_the_trained_slice():
    step = run_and_compare("mlp", "channels", "adamw", "eager", k=1)
    assert step.state["fc2.weight"]["exp_avg"].shape == (32, 8)       # Channels(0.25) of 32 input channels
    assert step.state["fc1.weight"]["exp_avg_sq"].shape == (16, 12)   # Channels(0.5, dim="out") of 32 rows
    assert set(step.state) == {"fc1.weight", "fc2.weight"}


@pytest.mark.slow      # ~10 s
def test_every_update_sits_right_after_its_gradient():
    """fuse_optimizer on its own: each update's nodes follow its gradient at once, and the gradient dies there."""
    from sparsecc.passes.fuse_optimizer import fuse_optimizer
    from sparsecc.passes.prune_backward import prune_backward
    from sparsecc.passes.subtensor_grads import subtensor_grads
    from torch.utils._pytree import tree_flatten
    model, _ = make("transformer")
    x, y, loss_fn = data("transformer")
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(lr=1e-3), executor="eager",
                                       update=SCHEMES["transformer"]["mixed"], example_inputs=(x, y))
    leaves, spec = tree_flatten((x, y))
    joint, plan = step._export(leaves, spec)
    for fn in (prune_backward, subtensor_grads, fuse_optimizer):
        fn(joint, plan)
    nodes = list(joint.graph.nodes)
    runs, i = [], 0
    while i < len(nodes):
        if nodes[i].meta.get("sparsecc_pass") == "fuse_optimizer":
            j = i
            while j < len(nodes) and nodes[j].meta.get("sparsecc_pass") == "fuse_optimizer":
                j += 1
            runs.append((i, j))
            i = j
        i += 1
    assert len(runs) == len(joint.meta["sparsecc_updates"]) == 11
    for start, end in runs:
        grad = nodes[start - 1]                       # the node right before the update: its gradient
        users = set(grad.users)
        assert users and all(start <= nodes.index(u) < end for u in users), grad.name


def test_no_full_size_gradient_for_channels_parameters():
    model, _ = make("mlp")
    x, y, loss_fn = data("mlp")
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(lr=0.1, momentum=0.9),
                                       update=SCHEMES["mlp"]["mixed"], example_inputs=(x, y), executor="eager")
    from sparsecc.memory import storage_roots
    roots = storage_roots(step.graph)
    full_size = [n.name for n in step.graph.graph.nodes if n.op == "call_function" and roots[n] is n
                 and tuple(getattr(n.meta["val"], "shape", ())) == (32, 32)]   # fc2.weight is Channels(0.25)
    assert full_size == [], full_size
    assert step.state["fc2.weight"]["momentum_buffer"].shape == (32, 8)
    assert step.report.stats["updates_fused"] == 4


@pytest.mark.slow      # 7-15 s each; test_memory_model_and_measurement checks a measurement in the quick loop
@pytest.mark.parametrize("executor,fuse_loss", [("eager", True), ("inductor", False)])
def test_memory_estimate_matches_the_measurement(executor, fuse_loss):
    """Eager: the liveness model, within 10 % (0.1 % on the benchmark models). Inductor: the buffer plan of the
    wrapper it generated, to 1 %, here with Inductor's own full-logits cross-entropy (the fused op's workspace is
    measured in tests/test_fused_loss.py)."""
    model, _ = make("transformer")
    x, y, loss_fn = data("transformer")
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(lr=1e-3), fuse_loss=fuse_loss,
                                       update=SCHEMES["transformer"]["mixed"], example_inputs=(x, y), executor=executor)
    step(x, y)
    measured = step.measure_memory(x, y)
    assert step.report.stats["losses_fused"] == fuse_loss
    assert step.report.timeline.model == ("Inductor's buffer plan" if executor == "inductor" else "liveness model")
    tolerance = 0.01 if executor == "inductor" else 0.1
    assert abs(step.report.stats["peak_bytes_estimate"] - measured) <= tolerance * measured


def test_eager_memory_model_counts_onednn_copies_in_convolutions():
    """A CPU convolution over 16 channels runs on oneDNN copies of its input and weight (here 256 KB beside the
    input): the eager model measures that once per shape; without it it was 0.78x of this step's peak."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False),
                                torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(32, 5))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 5, (64,))
    step = sparsecc.compile_train_step(model, F.cross_entropy, optimizer=sparsecc.SGD(lr=0.1), update=US({"8.*": "full"}),
                                       example_inputs=(x, y), executor="eager")
    measured = step.measure_memory(x, y)
    assert abs(step.report.stats["peak_bytes_estimate"] - measured) <= 0.02 * measured


def test_set_lr_changes_the_update_without_recompiling():
    model, _ = make("mlp")
    x, y, loss_fn = data("mlp")
    twin = copy.deepcopy(model)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(lr=0.1), update=US.full(),
                                       example_inputs=(x, y), executor="eager")
    step(x, y)
    step.set_lr(0.0)
    frozen_now = copy.deepcopy(model.state_dict())
    step(x, y)
    assert all(torch.equal(v, frozen_now[k]) for k, v in model.state_dict().items())
    step.set_lr(0.3)
    assert step.optimizer.lr == 0.3                    # what a saved artifact's manifest records
    step(x, y)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    for lr in (0.1, 0.0, 0.3):
        for group in ref.param_groups:
            group["lr"] = lr
        ref.zero_grad()
        loss_fn(twin(x), y).backward()
        ref.step()
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert step.compilations == 1


def test_new_input_shape_recompiles_and_stays_exact():
    model, _ = make("mlp")
    x, y, loss_fn = data("mlp")
    twin = copy.deepcopy(model)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(lr=0.1), update=US({"fc3.*": "full"}),
                                       example_inputs=(x, y), executor="eager")
    x2, y2 = x[:3], y[:3]
    step(x2, y2)
    assert step.compilations == 2
    reference_steps(twin, x2, y2, loss_fn, US({"fc3.*": "full"}), lambda ps: torch.optim.SGD(ps, lr=0.1), 1)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_state_dict_round_trip():
    model, _ = make("convnet")
    x, y, loss_fn = data("convnet")
    scheme = SCHEMES["convnet"]["mixed"]
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(lr=1e-2), update=scheme,
                                       example_inputs=(x, y), executor="eager")
    step(x, y)
    saved = step.state_dict()
    a = [step(x, y) for _ in range(2)]
    model2, _ = make("convnet", seed=5)
    step2 = sparsecc.compile_train_step(model2, loss_fn, optimizer=sparsecc.AdamW(lr=1e-2), update=scheme,
                                        example_inputs=(x, y), executor="eager")
    step2.load_state_dict(saved)
    b = [step2(x, y) for _ in range(2)]
    torch.testing.assert_close(torch.stack(a), torch.stack(b))
    for (k, v1), (_, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        torch.testing.assert_close(v1, v2, msg=k)


def test_memory_model_and_measurement(tmp_path):
    model, _ = make("transformer")
    x, y, loss_fn = data("transformer")
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(lr=0.1),
                                       update=SCHEMES["transformer"]["mixed"], example_inputs=(x, y), executor="eager")
    report = step.report
    assert report.timeline.peak == report.stats["peak_bytes_estimate"] > 0
    reorder = next(p for p in report.passes if p.name == "reorder_for_memory")
    assert reorder.counts["peak_bytes_after"] <= reorder.counts["peak_bytes_before"]
    measured = step.measure_memory(x, y)
    assert measured > 0 and report.stats["peak_bytes_measured"] == measured
    assert "measured" in str(report)
    assert "<svg" in report.save_html(tmp_path / "r.html").read_text()


def test_bad_inputs():
    model, _ = make("mlp")
    x, y, loss_fn = data("mlp")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sparsecc.ConfigError, match="lr"):
        sparsecc.SGD(lr=-1.0)
    with pytest.raises(sparsecc.ConfigError, match="betas"):
        sparsecc.AdamW(lr=1e-3, betas=(0.9, 1.5))
    with pytest.raises(sparsecc.ConfigError, match="scalar"):
        sparsecc.compile_train_step(model, lambda out, y: (out - y).square(), optimizer=sparsecc.SGD(lr=0.1),
                                    example_inputs=(x, y), executor="eager")
    with pytest.raises(sparsecc.ConfigError, match="optimizer must be"):
        sparsecc.compile_train_step(model, loss_fn, optimizer=torch.optim.SGD, example_inputs=(x, y))
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(lr=0.1), example_inputs=(x, y),
                                       executor="eager")
    with pytest.raises(sparsecc.ConfigError, match="lr"):
        step.set_lr(-0.5)
    with pytest.raises(sparsecc.ConfigError, match=r"(?s)structured as .* the step was compiled for"):
        step(x, [1, 2, 3])
    with pytest.raises(sparsecc.ConfigError, match=r"x is float32 \[7, 11\], the step was compiled for float32 "
                                                   r"\[7, 12\]; compiling the step for this batch failed"):
        step(x[:, :11], y)                     # a feature short: fc1 cannot take it
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.slow      # ~6 s; tests/test_real_models.py trains transformers models too
def test_transformers_llama_with_keyword_inputs():
    """A transformers model called with a dict of keywords; loss_fn receives its output object."""
    model, (ids,) = make("llama")
    y = torch.randint(0, 64, ids.shape, generator=torch.Generator().manual_seed(2))

    def loss_fn(out, y):
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    scheme = US({"model.layers.1.*norm.weight": "full", "model.layers.1.mlp.*_proj.weight": C(0.25),
                 "lm_head.weight": C(0.5, select="magnitude")})
    ref = copy.deepcopy(model)

    class Keywords(torch.nn.Module):      # the reference calls model(input_ids=...) too
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids)

    ref_losses = reference_steps(Keywords(ref), ids, y, loss_fn, US({f"inner.{k}": v for k, v in scheme.rules.items()}),
                                 lambda ps: torch.optim.AdamW(ps, lr=1e-2), 2)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(lr=1e-2), update=scheme,
                                       example_inputs=({"input_ids": ids}, y), executor="eager")
    losses = [step({"input_ids": ids}, y) for _ in range(2)]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses))
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_in_place_updates_stay_after_the_reads_of_the_old_weight_under_torch_2_11s_inductor(monkeypatch):
    """torch 2.11's Inductor (CPU backend) dropped the ordering of in-place writes when its fusion recomputed a
    kernel's loop body (pytorch/pytorch#177631): the update of blocks.2.attn.proj's trained rows ran before the
    backward's GEMM still reading proj's old weight, and blocks.1's gradients came out wrong (by 0.07; found running
    this suite on torch 2.11). Here torch's method is replaced by 2.11's; compile_train_step keeps the order
    (_torch.inductor_keeps_write_order) and the step equals torch.optim's."""
    from torch._inductor.scheduler import SchedulerNode

    def recompute_size_and_body_211(self, extra_indexing_constraints=None, recompute_sizes_body_func=None):
        self._compute_attrs(extra_indexing_constraints=extra_indexing_constraints,
                            recompute_sizes_body_func=recompute_sizes_body_func)
    monkeypatch.setattr(SchedulerNode, "recompute_size_and_body", recompute_size_and_body_211)
    scheme = US({"blocks.1.mlp.fc1.weight": C(0.25), "blocks.2.attn.proj.weight": C(0.5, dim="out")})
    model, _ = make("transformer")
    x, y, loss_fn = data("transformer")
    ref = copy.deepcopy(model)
    reference_steps(ref, x, y, loss_fn, scheme, lambda ps: torch.optim.SGD(ps, lr=1.0), 1)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(lr=1.0), update=scheme,
                                       example_inputs=(x, y))
    wrapped = SchedulerNode.recompute_size_and_body
    step(x, y)
    assert SchedulerNode.recompute_size_and_body is wrapped       # the wrapper is gone after the compilation
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def test_the_write_order_wrapper_is_a_no_op_where_torch_has_the_fix():
    """torch 2.12+ keeps the ordering deps itself (#177816): inductor_keeps_write_order must recognise that and leave
    Inductor alone (wrapping a fixed method would rename a node's reads twice)."""
    from torch._inductor.scheduler import SchedulerNode
    from sparsecc._torch import inductor_keeps_write_order
    if torch.__version__ < "2.12":
        pytest.skip("torch 2.11 lacks the fix: the wrapper applies there (the test above)")
    method = SchedulerNode.recompute_size_and_body
    with inductor_keeps_write_order():
        assert SchedulerNode.recompute_size_and_body is method
