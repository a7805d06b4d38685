"""The SwiGLU backward written in place (passes/swiglu_backward_in_place.py, ops/swiglu.py): the ops against float64
formulas, the pass's recognition by value and its safety checks on traced graphs, and transformers Llamas trained
through it under both executors against torch.optim, with the memory it saves."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import sparsecc
import sparsecc.ops  # noqa: F401  (registers the sparsecc:: ops)
from sparsecc.config import Channels as C
from sparsecc.config import UpdateScheme as US
from sparsecc.ops import swiglu
from sparsecc.passes.swiglu_backward_in_place import swiglu_backward_in_place
from sparsecc.pipeline import TRAIN_STEP_PASSES
from test_train_step import reference_steps

ops = torch.ops.sparsecc
TOL = {torch.float32: {}, torch.float64: {}, torch.float16: {"rtol": 2e-3, "atol": 1e-4},
       torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3}}


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    monkeypatch.delenv("SPARSECC_TRITON", raising=False)


def tensors(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g, up, gate = (torch.randn(shape, generator=gen) for _ in range(3))
    return g.to(dtype), up.to(dtype), (gate * 6).to(dtype)


def formulas(g, up, gate, dtype):
    g, up, gate = g.double(), up.double(), gate.double()
    s = torch.sigmoid(gate)
    return (g * up * s * (1 + gate * (1 - s))).to(dtype), (g * gate * s).to(dtype)


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "pytorch"])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (3, swiglu.CHUNK // 2 + 5)),   # two chunks, the last short
                                         (torch.bfloat16, (2, 5, 7)), (torch.float64, (33,)), (torch.float16, (9,))])
def test_ops_write_the_gradients_in_place(dtype, shape, native, monkeypatch):
    """The C++ kernel (float32, float64, bfloat16) and the chunked PyTorch fallback (SPARSECC_NATIVE=0; float16)."""
    if not native:
        monkeypatch.setenv("SPARSECC_NATIVE", "0")
    g, up, gate = tensors(shape, dtype)
    d_gate, d_up = formulas(g, up, gate, dtype)
    up_storage, g_storage = up.data_ptr(), g.data_ptr()
    ops.swiglu_grad_gate_(up, g, gate)
    ops.swiglu_grad_up_(g, gate)
    torch.testing.assert_close(up, d_gate, **TOL[dtype])
    torch.testing.assert_close(g, d_up, **TOL[dtype])
    assert (up.data_ptr(), g.data_ptr()) == (up_storage, g_storage)
    torch.library.opcheck(ops.swiglu_grad_gate_.default, tensors((4, 6), dtype))
    torch.library.opcheck(ops.swiglu_grad_up_.default, tensors((4, 6), dtype)[::2])


def test_ops_refuse_mismatched_tensors():
    g, up, gate = tensors((4, 6), torch.float32)
    with pytest.raises(ValueError, match="share shape, dtype and device"):
        ops.swiglu_grad_gate_(up, g[:2], gate)
    with pytest.raises(ValueError, match="contiguous"):
        ops.swiglu_grad_up_(g.t(), gate.t())
    torch.testing.assert_close(g, tensors((4, 6), torch.float32)[0])     # nothing written


# --- the pass on traced backward computations -------------------------------------------------------------------

def decomposed(g, gate, up):
    """The spelling of a bf16 Llama's step graph: silu as x / (1 + exp(-x)) in float32, its derivative in bf16."""
    z = gate.float()
    d_up = g * (z / (torch.exp(-z) + 1)).to(gate.dtype)
    s = torch.sigmoid(gate)
    d_gate = g * up * (s * (gate * (torch.ones_like(s) - s) + 1))
    return d_gate, d_up


def library(g, gate, up):
    """The same gradients through aten's own silu_backward and silu."""
    return torch.ops.aten.silu_backward(g * up, gate), g * F.silu(gate)


def gelu_not_silu(g, gate, up):
    return g * up * torch.sigmoid(1.702 * gate), g * F.gelu(gate)


def step(spelling, read_up_late=False):
    """A gated MLP's backward from its weights: gate, up and g computed by matmuls (so their storages are the
    graph's own), each gradient read by two matmuls."""
    def fn(x, w_gate, w_up, go, w_down):
        gate, up, g = x @ w_gate, x @ w_up, go @ w_down
        d_gate, d_up = spelling(g, gate, up)
        out = [d_gate @ w_gate.t() + d_up @ w_up.t(), x.t() @ d_gate, x.t() @ d_up]
        if read_up_late:
            out.append(up * 2)          # reads up after the gradients' first reader: must not see d_gate there
        return out
    return fn


def inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=gen).to(dtype) for s in ((6, 8), (8, 16), (8, 16), (6, 4), (4, 16))]


def run_pass(fn, args):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    result = swiglu_backward_in_place(gm, None)
    return gm, result


@pytest.mark.parametrize("spelling,dtype", [(decomposed, torch.bfloat16), (decomposed, torch.float32),
                                            (library, torch.float32)])
def test_recognised_by_value_and_exact(spelling, dtype):
    args = inputs(dtype)
    gm, result = run_pass(step(spelling), args)
    assert result.counts["swiglu_backwards_in_place"] == 1, result.notes
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(ops.swiglu_grad_gate_.default) == targets.count(ops.swiglu_grad_up_.default) == 1
    assert torch.ops.aten.sigmoid.default not in targets and torch.ops.aten.silu_backward.default not in targets
    exact = step(spelling)(*[a.double() for a in args])
    for got, eager, ref in zip(gm(*args), step(spelling)(*args), exact):
        if dtype == torch.float32:
            torch.testing.assert_close(got, eager)
        else:       # bf16 matmuls of bf16 gradients: within bf16's rounding of the outputs' scale, as eager is
            for result in (got, eager):
                torch.testing.assert_close(result.double(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_not_a_swiglu_is_left_alone():
    gm, result = run_pass(step(gelu_not_silu), inputs())
    assert result.counts["swiglu_backwards_in_place"] == 0 and not result.notes
    assert ops.swiglu_grad_gate_.default not in [n.target for n in gm.graph.nodes]


def test_a_later_read_of_up_keeps_the_graph_as_it_is():
    args = inputs()
    gm, result = run_pass(step(library, read_up_late=True), args)
    assert result.counts["swiglu_backwards_in_place"] == 0
    assert any("reads" in note and "after the gradients are written there" in note for note in result.notes), \
        result.notes
    for got, ref in zip(gm(*args), step(library, read_up_late=True)(*args)):
        torch.testing.assert_close(got, ref)


def test_left_alone_where_the_fallbacks_temporaries_outweigh_the_saving(monkeypatch):
    """Without the C++ kernel (SPARSECC_NATIVE=0) the CPU ops compute over float32 chunks: at these sizes the chunks
    are larger than the buffers the rewrite would save, so it is not made, and the report says why."""
    monkeypatch.setenv("SPARSECC_NATIVE", "0")
    gm, result = run_pass(step(library), inputs())
    assert result.counts["swiglu_backwards_in_place"] == 0
    assert any("outweigh the buffer it saves" in note for note in result.notes), result.notes


# --- transformers Llamas through compile_train_step --------------------------------------------------------------

def llama(intermediate=64, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).to(dtype)


def loss_fn(out, y):
    return F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())


SCHEME = US({"model.layers.0.*norm.weight": "full", "model.layers.1.mlp.*_proj.weight": C(0.25),
             "model.norm.weight": "full"})


def train_llama(executor: str, steps: int):
    """(step, its losses, torch.optim's losses, the largest parameter difference) after `steps` AdamW steps of a
    tiny Llama under SCHEME (both MLPs in the backward) through compile_train_step and through torch.optim."""
    model = llama()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (2, 12), generator=gen), torch.randint(0, 64, (2, 12), generator=gen)
    ref = copy.deepcopy(model)
    ref_losses = reference_steps(ref, x, y, loss_fn, SCHEME, lambda ps: torch.optim.AdamW(ps, lr=1e-2), steps)
    step_ = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(lr=1e-2), update=SCHEME,
                                        example_inputs=(x, y), executor=executor)
    losses = [step_(x, y) for _ in range(steps)]
    diff = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    return step_, torch.stack(losses), torch.stack(ref_losses), diff


@pytest.mark.parametrize("executor", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_llama_trains_through_it_like_torch_optim(executor):
    step_, losses, ref_losses, diff = train_llama(executor, 3)
    entry = next(p for p in step_.report.passes if p.name == "swiglu_backward_in_place")
    assert entry.counts["swiglu_backwards_in_place"] == 2, entry.notes      # both blocks' MLPs
    code = step_.report.graphs["train_step/final"]
    assert code.count("sparsecc.swiglu_grad_gate_") == code.count("sparsecc.swiglu_grad_up_") == 2
    torch.testing.assert_close(losses, ref_losses)
    assert diff < 1e-5, diff


@pytest.mark.slow      # two Inductor compilations of a Llama step (~25 s)
def test_inductor_reuses_the_inputs_storage_and_the_model_says_so(monkeypatch):
    """A Llama whose peak is its last MLP's backward (intermediate 1024 over 64 tokens): with the pass, Inductor's
    plan and the measured peak are at least one [tokens, intermediate] buffer lower, and the plan stays exact."""
    model = llama(intermediate=1024)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    scheme = US({"model.layers.0.input_layernorm.weight": "full", "model.layers.1.mlp.down_proj.weight": C(0.25)})
    peaks = {}
    for name, passes in (("with", TRAIN_STEP_PASSES),
                         ("without", [p for p in TRAIN_STEP_PASSES if p is not swiglu_backward_in_place])):
        monkeypatch.setattr("sparsecc.train_step.TRAIN_STEP_PASSES", passes)
        step_ = sparsecc.compile_train_step(copy.deepcopy(model), loss_fn, optimizer=sparsecc.AdamW(lr=1e-2),
                                            update=scheme, example_inputs=(x, x))
        peaks[name] = step_.report.stats["peak_bytes_estimate"], step_.measure_memory(x, x)
    buffer = 4 * 16 * 1024 * 4
    assert peaks["with"][0] <= peaks["without"][0] - buffer, peaks
    assert peaks["with"][1] <= peaks["without"][1] - buffer, peaks
    assert abs(peaks["with"][0] - peaks["with"][1]) <= 0.02 * peaks["with"][1], peaks


def test_portable_graphs_keep_plain_aten():
    model = llama()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    step_ = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(lr=0.1), update=SCHEME,
                                        example_inputs=(x, x), executor="eager")
    gm, _ = step_.portable_graph(x, x)
    assert not [n for n in gm.graph.nodes if "swiglu" in str(n.target)]


TRITON_SCRIPT = r'''
import json
from test_swiglu_backward import train_llama
from sparsecc.codegen import triton as kernels
out = {}
for executor in ("eager", "inductor"):
    step, losses, ref_losses, diff = train_llama(executor, 2)
    out[executor] = {"losses": losses.tolist(), "ref_losses": ref_losses.tolist(), "diff": diff,
                     "ops": step.report.graphs["train_step/final"].count("sparsecc.swiglu_grad_")}
out["kernels"] = sorted(kernels.generated_sources())
print(json.dumps(out))
'''


@pytest.mark.slow      # ~40 s: a subprocess interpreting the kernels, one Inductor compilation
def test_llama_trains_through_the_triton_kernels_in_the_interpreter(tmp_path):
    from test_triton_end_to_end import kernel_ops, run_in_interpreter
    result = run_in_interpreter(TRITON_SCRIPT, tmp_path)
    for executor in ("eager", "inductor"):
        run = result[executor]
        assert run["ops"] == 4, run                   # two blocks, two in-place ops each
        assert run["losses"] == pytest.approx(run["ref_losses"], rel=1e-5), executor
        assert run["diff"] < 1e-5, (executor, run["diff"])
    assert "swiglu_backward" in kernel_ops(result["kernels"]), result["kernels"]
