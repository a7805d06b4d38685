"""Sparse weights end to end: the CSR ops, the sparsify rewrite against the dense masked reference on real
models, masks that stay put through training, picked-up prune/parametrize masks, the cost model's refusals,
and dynamic sparse training without recompiling."""
import copy
import json
from dataclasses import dataclass
import math
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from torch.nn.utils import parametrize, prune

import sparsecc
from sparsecc import cost_model
from sparsecc.ops import tuning
from sparsecc.export import layouts
from sparsecc.ops import native
from sparsecc.ops.csr import to_csr
from sparsecc.sparse_registry import registered
from sparsecc.sparsity import Pattern

from conftest import loss_of
from models import make

ops = torch.ops.sparsecc
SPEC = {"transformer": {"blocks.*.mlp.*.weight": sparsecc.NM(2, 4), "blocks.*.attn.*.weight": sparsecc.Blocks(8, 0.25),
                        "head.weight": sparsecc.Unstructured(0.3)},
        "convnet": {"pw.weight": sparsecc.NM(1, 4), "stem.weight": sparsecc.Unstructured(0.5),
                    "head.weight": sparsecc.Unstructured(0.4)}}


def csr_sample(out, inp, pattern, n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=dtype)
    mask = pattern.mask(w)
    index = to_csr(mask)
    x = torch.randn(n, inp, generator=gen, dtype=dtype)
    return w * mask, mask, w.reshape(-1)[index["flat"]], index, x


def csr_args(values, i, n_out):
    return values, i["crow"], i["col"], i["t_crow"], i["t_col"], i["t_perm"], n_out


# ---- the ops ------------------------------------------------------------------------------------------------

def test_csr_opcheck_every_op():
    dense, _, values, i, x = csr_sample(12, 16, sparsecc.Unstructured(0.3), 5, torch.float32)
    g = torch.randn(5, 12)
    torch.library.opcheck(ops.csr_mm, (x.requires_grad_(), *csr_args(values.requires_grad_(), i, 12)))
    torch.library.opcheck(ops.csr_mm_t, (g, values.detach(), i["t_crow"], i["t_col"], i["t_perm"], 16))
    torch.library.opcheck(ops.csr_sddmm, (g, x.detach(), i["crow"], i["col"]))


def test_csr_gradcheck_float64():
    _, _, values, i, x = csr_sample(6, 8, sparsecc.NM(2, 4), 3)
    x.requires_grad_()
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, v: ops.csr_mm(a, *csr_args(v, i, 6)), (x, values))


def nm_args(values, i, n_out, m):
    return values, i["crow"], i["col"], i["t_crow"], i["t_col"], i["t_perm"], n_out, m


def test_nm_opcheck_and_gradcheck_float64():
    _, _, values, i, x = csr_sample(12, 16, sparsecc.NM(2, 4), 5, torch.float32)
    g = torch.randn(5, 12)
    torch.library.opcheck(ops.nm_mm, (x.requires_grad_(), *nm_args(values.requires_grad_(), i, 12, 4)))
    torch.library.opcheck(ops.nm_mm_t, (g, values.detach(), i["col"], i["t_crow"], i["t_col"], i["t_perm"], 16, 4))
    torch.library.opcheck(ops.nm_sddmm, (g, x.detach(), i["crow"], i["col"], 4))
    _, _, values, i, x = csr_sample(6, 8, sparsecc.NM(1, 4), 3)
    x.requires_grad_()
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, v: ops.nm_mm(a, *nm_args(v, i, 6, 4)), (x, values))


@pytest.mark.parametrize("native_kernels", ["1", "0"])
def test_nm_ops_are_the_csr_ops_on_the_cpu(native_kernels, monkeypatch):
    """On the CPU an N:M weight runs the CSR kernels: forward and both gradients bit for bit."""
    monkeypatch.setenv("SPARSECC_NATIVE", native_kernels)
    _, _, values, i, x = csr_sample(24, 32, sparsecc.NM(2, 8), 7, torch.float32)
    g = torch.randn(7, 24)
    t = (i["t_crow"], i["t_col"], i["t_perm"])
    assert torch.equal(ops.nm_mm(x, *nm_args(values, i, 24, 8)), ops.csr_mm(x, *csr_args(values, i, 24)))
    assert torch.equal(ops.nm_mm_t(g, values, i["col"], *t, 32, 8), ops.csr_mm_t(g, values, *t, 32))
    assert torch.equal(ops.nm_sddmm(g, x, i["crow"], i["col"], 8), ops.csr_sddmm(g, x, i["crow"], i["col"]))


def test_nm_sparse_weight_needs_an_nm_support():
    from sparsecc.sparse_weights import SparseWeight
    mask = sparsecc.NM(2, 4).mask(torch.randn(4, 8))
    assert SparseWeight.create("w", sparsecc.NM(2, 4), mask, torch.float32).pattern.op == "nm_mm"
    mask[0, :4] = True                                      # 4 of 4 in one group
    with pytest.raises(ValueError, match=r"w: the support is not NM\(n=2, m=4\)"):
        SparseWeight.create("w", sparsecc.NM(2, 4), mask, torch.float32)


@settings(max_examples=30, deadline=None)
@given(pattern=st.sampled_from([sparsecc.NM(1, 4), sparsecc.NM(2, 4), sparsecc.NM(2, 8), sparsecc.NM(4, 8),
                                sparsecc.Unstructured(0.05), sparsecc.Unstructured(0.5), sparsecc.Unstructured(1.0)]),
       out=st.integers(1, 40), groups=st.integers(1, 6), n=st.integers(1, 9), seed=st.integers(0, 999))
def test_csr_matches_dense_masked_reference(pattern, out, groups, n, seed):
    """Forward, input gradient and weight gradient (only at the nonzeros), in float64; ragged shapes,
    one token, empty rows."""
    dense, mask, values, i, x = csr_sample(out, 8 * groups, pattern, n, seed=seed)
    x.requires_grad_()
    values.requires_grad_()
    y = ops.csr_mm(x, *csr_args(values, i, out))
    g = torch.randn_like(y)
    y.backward(g)
    wr = dense.clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    (xr @ wr.T).backward(g)
    torch.testing.assert_close(y, xr.detach() @ dense.T)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(values.grad, wr.grad.reshape(-1)[i["flat"]])


@pytest.mark.skipif(not native.available(), reason=f"no native kernels: {native.why_unavailable()}")
@settings(max_examples=20, deadline=None)
@given(b=st.sampled_from([8, 16, 32, 64]), ob=st.integers(1, 3), ib=st.integers(1, 3), density=st.floats(0.05, 1.0),
       n=st.integers(1, 13), seed=st.integers(0, 999), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_native_block_kernels_match_torch(b, ob, ib, density, n, seed, dtype):
    from sparsecc.ops.block_sparse import to_blocks
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(ob * b, ib * b, generator=gen, dtype=dtype)
    mask = sparsecc.Blocks(b, density).mask(w)
    values, rows, cols = to_blocks(w * mask, mask, b)
    x = torch.randn(n, ib * b, generator=gen, dtype=dtype)
    g = torch.randn(n, ob * b, generator=gen, dtype=dtype)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(native.block_spmm(x, values, rows, cols, ob * b), x @ (w * mask).T, **tol)
    torch.testing.assert_close(native.block_spmm(g, values.transpose(1, 2), cols, rows, ib * b), g @ (w * mask), **tol)
    gw = (g.T @ x).reshape(ob, b, ib, b).permute(0, 2, 1, 3)[rows, cols]
    torch.testing.assert_close(native.block_sddmm(g, x, rows, cols, b), gw, **tol)


@pytest.mark.parametrize("native_kernels", ["1", "0"])
def test_sparse_ops_match_reference_with_and_without_native_kernels(native_kernels, monkeypatch):
    """The C++ kernels and the PyTorch fallbacks (SPARSECC_NATIVE=0) both match the dense masked reference."""
    monkeypatch.setenv("SPARSECC_NATIVE", native_kernels)
    from sparsecc.ops.block_sparse import from_blocks, to_blocks
    gen = torch.Generator().manual_seed(0)
    w, x, g = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((48, 64), (5, 64), (5, 48)))
    mask = sparsecc.Blocks(16, 0.4).mask(w)
    values, rows, cols = to_blocks(w * mask, mask, 16)
    torch.testing.assert_close(ops.block_sparse_mm(x, values, rows, cols, 48), x @ (w * mask).T)
    torch.testing.assert_close(ops.block_sparse_mm_t(g, values, rows, cols, 64), g @ (w * mask))
    torch.testing.assert_close(from_blocks(ops.block_sddmm(g, x, rows, cols, 16), rows, cols, w.shape),
                               (g.T @ x) * mask)
    mask = sparsecc.NM(2, 4).mask(w)
    i = to_csr(mask)
    values = w.reshape(-1)[i["flat"]]
    torch.testing.assert_close(ops.csr_mm(x, *csr_args(values, i, 48)), x @ (w * mask).T)
    torch.testing.assert_close(ops.csr_mm_t(g, values, i["t_crow"], i["t_col"], i["t_perm"], 64), g @ (w * mask))
    torch.testing.assert_close(ops.csr_sddmm(g, x, i["crow"], i["col"]), (g.T @ x).reshape(-1)[i["flat"]])


# ---- the rewrite on real models -------------------------------------------------------------------------------

# which sparse op each weight of SPEC becomes (cost model off: every candidate is rewritten)
EXPECTED_REWRITES = {
    "transformer": {**{f"blocks.{i}.attn.{n}.weight": "block_sparse_mm" for i in range(3) for n in ("q", "k", "v", "proj")},
                    **{f"blocks.{i}.mlp.fc{j}.weight": "nm_mm" for i in range(3) for j in (1, 2)},
                    "head.weight": "csr_mm"},
    "convnet": {"pw.weight": "nm_mm", "head.weight": "csr_mm"},
}


def sparse_model(name, seed=0, rules=None):
    model, inputs = make(name, seed)
    spec = sparsecc.Sparsity(rules or SPEC[name])
    sparsecc.sparsify(model, spec)
    return model, inputs, spec


def masked_reference(model, inputs):
    """The dense masked reference: eager dense forward on the pruned weights, gradients masked."""
    ref = copy.deepcopy(model)
    loss = loss_of(ref(*inputs))
    loss.backward()
    masks = model.sparsecc_masks
    names = {id(p): n for n, p in ref.named_parameters(remove_duplicate=False) if n in masks}
    return loss.detach(), {n: p.grad * masks[names[id(p)]] if id(p) in names else p.grad
                           for n, p in ref.named_parameters()}


@pytest.mark.parametrize("name,executor", [pytest.param("transformer", "inductor", marks=pytest.mark.slow),
                                           ("convnet", "eager")])
def test_sparse_model_matches_dense_masked_reference(name, executor):
    model, inputs, spec = sparse_model(name)
    ref_loss, ref_grads = masked_reference(model, inputs)
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, cost_model="off", executor=executor))
    loss = loss_of(compiled(*inputs))
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=lambda m: f"{n}: {m}")
    report = sparsecc.reports()[-1]
    ops_done = report.stats["sparse_ops"]
    # transformer: 3 blocks x (4 attention + 2 MLP linears) + the head; convnet: the 1x1 conv and the head
    assert ops_done == (19 if name == "transformer" else 2)
    rewritten = dict(re.findall(r"^\s*(\S+): \S+ \([^)]*\) -> sparsecc::(\w+) \[", str(report), re.MULTILINE))
    assert rewritten == EXPECTED_REWRITES[name]
    if name == "transformer":
        assert "-> sparsecc::block_sparse_mm [blocks 8x8" in str(report)
    else:                                             # a 3x3 conv has no sparse op: it reads the masked weight
        assert re.search(r"stem\.weight: \S+ not rewritten", str(report))
    bw = report.graphs["backward/after"]
    assert "sparsecc.csr_sddmm" in bw and "sparsecc.csr_mm_t" in bw          # the unstructured head
    assert "sparsecc.nm_sddmm" in bw and "sparsecc.nm_mm_t" in bw            # the N:M weights
    assert "-> sparsecc::nm_mm [CSR, NM(" in str(report)


@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adamw", marks=pytest.mark.slow)])
def test_masks_survive_k_optimizer_steps_and_training_matches_reference(optimizer):
    """SGD with momentum and weight decay must track the masked reference; AdamW's normalised update turns
    rounding-level gradient differences into lr-sized steps, so for it only the masks are checked."""
    model, inputs, spec = sparse_model("transformer")
    ref = copy.deepcopy(model)
    masks = model.sparsecc_masks
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, cost_model="off", executor="eager"))
    make_opt = (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1)) if optimizer == "sgd" else \
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
    opt, ref_opt = make_opt(model.parameters()), make_opt(ref.parameters())
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for _ in range(4):
        loss_of(compiled(*inputs)).backward()
        opt.step()
        opt.zero_grad()
        loss_of(ref(*inputs)).backward()
        for n, m in masks.items():
            ref_params[n].grad.mul_(m)
        ref_opt.step()
        ref_opt.zero_grad()
    params = dict(model.named_parameters(remove_duplicate=False))
    for n, m in masks.items():
        assert params[n][~m].abs().max() == 0, f"{n}: a pruned entry became nonzero"
    for n, p in model.named_parameters() if optimizer == "sgd" else ():
        torch.testing.assert_close(p, ref_params[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


@dataclass(frozen=True)
class Columns(Pattern):
    """A pattern written the way NM, Blocks and Unstructured are: whole input columns, the largest norms kept.
    Stored entry by entry (the Pattern defaults: CSR, sparsecc::csr_mm, "unstructured" artifact layout)."""

    density: float
    movable = False      # DynamicSparsity moves single entries, which would break whole columns

    def check(self, name, weight):
        pass

    def mask(self, weight):
        m = weight.detach().reshape(weight.shape[0], -1)
        keep = torch.zeros(m.shape[1], dtype=torch.bool)
        keep[m.norm(dim=0).topk(max(1, math.ceil(self.density * m.shape[1]))).indices] = True
        return keep.expand_as(m).reshape(weight.shape)


def test_a_new_pattern_is_one_class_and_trains_on_the_sparse_kernels():
    """The pattern protocol: Columns above, defined only in this test, trains on sparsecc::csr_mm through the
    backend and the one-graph step and matches the dense masked reference; DynamicSparsity leaves it alone as it
    declares; an artifact stores it as flat positions."""
    model, inputs, spec = sparse_model("transformer", rules={"blocks.*.mlp.fc1.weight": Columns(0.5)})
    mask = model.sparsecc_masks["blocks.0.mlp.fc1.weight"]
    assert mask.any(0).sum() == mask.shape[1] // 2 and (mask == mask[:1]).all()       # whole columns
    ref_loss, ref_grads = masked_reference(model, inputs)
    compiled = torch.compile(copy.deepcopy(model), backend=sparsecc.backend(sparsity=spec, cost_model="off",
                                                                            executor="eager"))
    loss = loss_of(compiled(*inputs))
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    report = str(sparsecc.reports()[-1])
    assert report.count("-> sparsecc::csr_mm [CSR, Columns(density=0.5)") == 3          # one per block
    for n, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n.removeprefix("_orig_mod.")], msg=lambda m: f"{n}: {m}")

    step_model = copy.deepcopy(model)
    step = sparsecc.compile_train_step(step_model, lambda out, y: loss_of(out), optimizer=sparsecc.SGD(0.1),
                                       example_inputs=(inputs[0], None), executor="eager", cost_model="off")
    assert step.report.stats["sparse_ops"] == 3
    torch.testing.assert_close(step(inputs[0]), ref_loss)
    for n, p in step_model.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[n] - 0.1 * ref_grads[n], msg=lambda m: f"{n}: {m}")

    assert layouts.name(Columns(0.5)) == "unstructured"
    with pytest.raises(sparsecc.ConfigError, match=r"cannot move 'blocks.0.mlp.fc1.weight': Columns\(density=0.5\)"):
        sparsecc.DynamicSparsity(method="set", every=1, end_step=10).step(step_model, step=1)


def test_prune_and_parametrize_masks_are_picked_up():
    class Mask(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.register_buffer("mask", m)

        def forward(self, w):
            return w * self.mask

    def build():
        model, inputs = make("mlp")
        prune.l1_unstructured(model.fc1, "weight", 0.7)
        parametrize.register_parametrization(model.fc2, "weight", Mask((torch.rand(32, 32) > 0.6).float()))
        return model, inputs

    model, inputs = build()
    ref, _ = build()
    compiled = torch.compile(model, backend=sparsecc.backend(cost_model="off", executor="eager"))
    loss = loss_of(compiled(*inputs))
    loss.backward()
    ref_loss = loss_of(ref(*inputs))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{n}: {m}")
    report = sparsecc.reports()[-1]
    assert report.stats["sparse_ops"] == 2
    assert "fc1.weight_orig" in str(report) and "fc2.parametrizations.weight.original" in str(report)
    # a mask that grows outside the compiled support is refused, never computed wrongly
    with torch.no_grad():
        model.fc1.weight_mask.fill_(1)
    with pytest.raises(RuntimeError, match="fc1.weight_orig.*outside the sparsity"):
        compiled(*inputs)


@pytest.mark.slow      # ~9 s
def test_channels_on_a_sparse_weight_and_frozen_sparse_weights():
    model, inputs, spec = sparse_model("transformer")
    rule = sparsecc.Channels(0.25, dim="out")
    scheme = sparsecc.UpdateScheme({"blocks.0.mlp.fc1.weight": rule, "*.bias": "full"}, default="frozen")
    ref_loss, ref_grads = masked_reference(model, inputs)
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, update=scheme, cost_model="off"))
    loss_of(compiled(*inputs)).backward()
    w = model.blocks[0].mlp.fc1.weight
    k = rule.count(w.shape[0])
    torch.testing.assert_close(w.grad[:k], ref_grads["blocks.0.mlp.fc1.weight"][:k])
    assert w.grad[k:].abs().max() == 0
    bw = sparsecc.reports()[-1].graphs["backward/after"]
    # only one weight is trained (N:M): one weight-gradient SDDMM is left, no other SDDMM at all
    assert bw.count("sparsecc.nm_sddmm") == 1 and "block_sddmm" not in bw and "csr_sddmm" not in bw


def test_cost_model_refusal_is_reported_and_keeps_the_mask(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    model, inputs = make("mlp")
    spec = sparsecc.Sparsity({"fc2.weight": sparsecc.NM(2, 4)})
    sparsecc.sparsify(model, spec)
    shape = cost_model.LinearShape(7, 32, 32, torch.float32, "csr", 1, 0.5)
    tuning.cache_file(tuning.device_info()).parent.mkdir(parents=True, exist_ok=True)
    tuning.cache_file(tuning.device_info()).write_text(json.dumps({shape.key(): [1.0, 3.0]}))    # dense 1 ms, sparse 3 ms
    ref_loss, ref_grads = masked_reference(model, inputs)
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, executor="eager"))
    loss_of(compiled(*inputs)).backward()
    report = sparsecc.reports()[-1]
    assert report.stats["sparse_ops"] == 0 and report.stats["sparse_refused"] == 1
    assert "sparse 3.00 ms vs dense 1.00 ms (0.33x): not faster" in str(report)
    assert "sparsecc." not in report.graphs["forward/after"]
    torch.testing.assert_close(model.fc2.weight.grad, ref_grads["fc2.weight"])   # masked: zero where pruned


def test_a_dtype_the_cpu_kernels_do_not_take_is_kept_dense_with_the_reason(monkeypatch):
    """bfloat16 on the CPU path: the C++ kernels take float32/float64, so the call reads the weight masked
    (on the Triton path bfloat16 is rewritten: tests/test_triton_end_to_end.py)."""
    monkeypatch.delenv("SPARSECC_TRITON", raising=False)
    model, inputs = make("mlp")
    model = model.to(torch.bfloat16)
    inputs = tuple(x.to(torch.bfloat16) for x in inputs)
    spec = sparsecc.Sparsity({"fc2.weight": sparsecc.Blocks(8, 0.5)})
    sparsecc.sparsify(model, spec)
    ref_loss, ref_grads = masked_reference(model, inputs)
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, cost_model="off", executor="eager"))
    loss_of(compiled(*inputs)).backward()
    report = sparsecc.reports()[-1]
    assert report.stats["sparse_ops"] == 0 and report.stats["sparse_refused"] == 1
    assert "kept dense: dtype torch.bfloat16 (the sparse kernels here take float32/float64)" in str(report)
    torch.testing.assert_close(model.fc2.weight.grad, ref_grads["fc2.weight"])
    assert model.fc2.weight.grad[model.sparsecc_masks["fc2.weight"] == 0].abs().max() == 0


def test_cost_model_measures_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    shape = cost_model.LinearShape(16, 64, 64, torch.float32, "blocks", 16, 0.25)
    first = cost_model.decide(shape)
    assert first.speedup is not None and first.speedup > 0
    cached = json.loads(tuning.cache_file(tuning.device_info()).read_text())
    assert list(cached) == [shape.key()]
    assert cost_model.decide(shape) == first


# ---- dynamic sparsity --------------------------------------------------------------------------------------

def reference_rigl(w, mask, grad, fraction, grow_random=None):
    """RigL / SET on one unstructured weight, written directly from the papers' rule."""
    live = mask.flatten().tolist()
    n = round(fraction * sum(live))
    mags = w.abs().flatten().tolist()
    alive = sorted((m, i) for i, m in enumerate(mags) if live[i])
    dropped = {i for _, i in alive[:n]}
    scores = grow_random.flatten().tolist() if grow_random is not None else grad.abs().flatten().tolist()
    dead = sorted(((s, i) for i, s in enumerate(scores) if not live[i]), reverse=True)
    grown = {i for _, i in dead[:n]}
    new = [(live[i] and i not in dropped) or i in grown for i in range(len(live))]
    return torch.tensor(new).reshape(mask.shape)


@pytest.mark.parametrize("method,executor", [pytest.param("rigl", "inductor", marks=pytest.mark.slow),
                                             ("set", "eager")])
def test_dynamic_sparsity_matches_reference_without_recompiling(method, executor):
    """Masks move without recompiling, under Inductor (RigL) and the eager executor (SET)."""
    model, inputs, spec = sparse_model("transformer", rules={"blocks.*.attn.*.weight": sparsecc.Blocks(8, 0.25),
                                                            "blocks.*.mlp.*.weight": sparsecc.Unstructured(0.2),
                                                            "head.weight": sparsecc.Unstructured(0.3)})
    dyn = sparsecc.DynamicSparsity(method, every=2, end_step=20, drop_fraction=0.4, seed=3)
    counters.clear()
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, cost_model="off", executor=executor))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    name = "head.weight"
    head = model.head.weight
    for step in range(1, 7):
        loss_of(compiled(*inputs)).backward()
        opt.step()
        opt.zero_grad()
        grads = dyn.dense_grads(model, lambda: loss_of(model(*inputs))) if method == "rigl" else None
        before, w = model.sparsecc_masks[name].clone(), head.detach().clone()
        rand = None
        if method == "set" and dyn.due(step):
            gen = torch.Generator().manual_seed(3 * 1_000_003 + step)
            rand = torch.rand(w.shape, generator=gen)
        changed = dyn.step(model, step, opt, grads=grads)
        if dyn.due(step):
            expect = reference_rigl(w, before, None if grads is None else grads[name], dyn.drop_fraction_at(step), rand)
            assert torch.equal(model.sparsecc_masks[name], expect)
            assert changed[name] > 0
            assert int(expect.sum()) == int(before.sum())
        for n, m in model.sparsecc_masks.items():
            p = dict(model.named_parameters(remove_duplicate=False))[n]
            assert p[~m].abs().max() == 0 and opt.state[p]["momentum_buffer"][~m].abs().max() == 0
        with torch.no_grad():   # the compiled model computes with the moved masks
            ref_loss = loss_of(model(*inputs))
        torch.testing.assert_close(loss_of(compiled(*inputs)).detach(), ref_loss, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2      # one training graph (+ one no-grad graph), none per update
    (sw,) = registered(head)
    assert torch.equal(sw.mask, model.sparsecc_masks[name])


def test_gradual_magnitude_pruning_shrinks_density_on_a_fixed_support():
    model, inputs = make("mlp")
    spec = sparsecc.Sparsity({"fc2.weight": sparsecc.Unstructured(0.8)})
    sparsecc.sparsify(model, spec)
    dyn = sparsecc.DynamicSparsity("magnitude", every=1, end_step=4, final_density=0.2)
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, cost_model="off", executor="eager"))
    support = model.sparsecc_masks["fc2.weight"].clone()
    for step in range(1, 5):
        loss_of(compiled(*inputs)).backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.zero_grad()
        dyn.step(model, step)
    mask = model.sparsecc_masks["fc2.weight"]
    expected = dyn.density_at(3, support.float().mean().item())
    assert math.isclose(mask.float().mean().item(), expected, abs_tol=1 / mask.numel())
    assert not (mask & ~support).any() and torch.equal(registered(model.fc2.weight)[0].support, support)
    loss_of(compiled(*inputs)).backward()
    assert model.fc2.weight.grad[~mask].abs().max() == 0


def test_resparsifying_a_compiled_weight_updates_its_graph_or_asks_for_a_recompile():
    model, inputs, spec = sparse_model("transformer")
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, cost_model="off", executor="eager"))
    compiled(*inputs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))     # dense again: sparsify must choose new masks
    sparsecc.sparsify(model, spec)          # same patterns, same counts: the compiled graph follows in place
    with torch.no_grad():
        torch.testing.assert_close(loss_of(compiled(*inputs)), loss_of(model(*inputs)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(sparsecc.ConfigError, match="compiled as Unstructured.*torch._dynamo.reset"):
        sparsecc.sparsify(model, sparsecc.Sparsity({"head.weight": sparsecc.Unstructured(0.5)}))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_sparse_options_name_the_problem():
    model, inputs = make("mlp")
    spec = sparsecc.Sparsity({"fc2.weight": sparsecc.NM(2, 4)})
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec))
    with pytest.raises(Exception, match="fc2.weight.*call sparsecc.sparsify"):
        compiled(*inputs)
    with pytest.raises(sparsecc.ConfigError, match="option 'sparsity' must be a sparsecc.Sparsity"):
        sparsecc.backend(sparsity={"fc2.weight": sparsecc.NM(2, 4)})
    with pytest.raises(sparsecc.ConfigError, match="cost_model"):
        sparsecc.backend(cost_model="sometimes")
    with pytest.raises(sparsecc.ConfigError, match="method"):
        sparsecc.DynamicSparsity("prune", every=1, end_step=2)
    with pytest.raises(sparsecc.ConfigError, match="final_density"):
        sparsecc.DynamicSparsity("magnitude", every=1, end_step=2)
    sparsecc.sparsify(model, spec)
    before = model.fc2.weight.detach().clone()
    with pytest.raises(sparsecc.ConfigError, match="'fc2.weight'.*NM pattern"):
        sparsecc.DynamicSparsity("set", every=1, end_step=5).step(model, 1)
    assert torch.equal(model.fc2.weight, before)
    with pytest.raises(sparsecc.ConfigError, match="params='fc9.*' matches no sparse weight"):
        sparsecc.DynamicSparsity("set", every=1, end_step=5, params="fc9.*").step(model, 1)
    model, _ = make("mlp")
    sparsecc.sparsify(model, sparsecc.Sparsity({"fc2.weight": sparsecc.Unstructured(0.5)}))
    with pytest.raises(sparsecc.ConfigError, match="rigl.*dense_grads"):
        sparsecc.DynamicSparsity("rigl", every=1, end_step=5).step(model, 1)
