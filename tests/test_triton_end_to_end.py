"""Compiled graphs on the Triton path (SPARSECC_TRITON=1 on CPU tensors, kernels run in Triton's interpreter) match
eager references:
- a transformer with sparse weights (blocks, N:M, unstructured) and a mixed update scheme, trained through the
  backend: every sparsecc:: op runs as a generated kernel (N:M weights on the N:M ELL kernels);
- Channels rules: the sliced weight gradient runs as the generated channels_weight_grad kernel (through the backend
  and in compile_train_step) and compile_train_step's update of the trained channels as sgd_rows / adamw_rows.
In subprocesses: TRITON_INTERPRET must be set before triton is imported. The structural tests need no interpreter:
they only compile."""
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from conftest import triton_cannot_interpret
from models import make
from sparsecc.ops import tuning
from sparsecc.sparse_weights import SparseWeight

pytest.importorskip("triton")

SCRIPT = r'''
import copy, json, os, pathlib, re, torch, sparsecc
from models import make
from conftest import loss_of
from sparsecc.codegen import triton as kernels

model, (ids,) = make("transformer")
spec = sparsecc.Sparsity({"blocks.*.attn.*.weight": sparsecc.Blocks(16, 0.5),
                          "blocks.*.mlp.*.weight": sparsecc.NM(2, 4), "head.weight": sparsecc.Unstructured(0.3)})
sparsecc.sparsify(model, spec)
scheme = sparsecc.UpdateScheme({"blocks.2.attn.q.weight": "full", "blocks.2.mlp.fc1.weight": sparsecc.Channels(0.5),
                                "*.bias": "full", "head.weight": "full"}, default="frozen")
ref = copy.deepcopy(model)
trained = scheme.resolve(dict(model.named_parameters(remove_duplicate=False)))
compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, update=scheme, cost_model="off",
                                                          executor="eager"))
masks = model.sparsecc_masks
ref_params = dict(ref.named_parameters(remove_duplicate=False))
opt = torch.optim.SGD([p for n, p in model.named_parameters() if trained[n] != "frozen"], lr=0.1)
ref_opt = torch.optim.SGD([p for n, p in ref.named_parameters() if trained[n] != "frozen"], lr=0.1)
losses, ref_losses = [], []
for _ in range(2):
    loss = loss_of(compiled(ids)); loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    loss = loss_of(ref(ids)); loss.backward()
    for n, p in ref.named_parameters(remove_duplicate=False):
        rule = trained[n]
        if p.grad is None:
            continue
        if rule == "frozen":
            p.grad = None
            continue
        if n in masks:
            p.grad.mul_(masks[n])
        if isinstance(rule, sparsecc.Channels):
            p.grad[:, rule.count(p.shape[1]):] = 0
    ref_opt.step(); ref_opt.zero_grad(); ref_losses.append(loss.item())
diff = max((p - ref_params[n]).abs().max().item() for n, p in model.named_parameters())
html = sparsecc.reports()[-1].to_html()
graphs = "\n".join(sparsecc.reports()[-1].graphs.values())

# bfloat16 (what GPU training runs): one step through the backend vs float64 on the same bf16 weights
model16 = make("transformer")[0].to(torch.bfloat16)
sparsecc.sparsify(model16, spec)
ref64 = copy.deepcopy(model16).double()
loss16 = loss_of(torch.compile(model16, backend=sparsecc.backend(sparsity=spec, cost_model="off",
                                                                   executor="eager"))(ids))
loss16.backward()
loss64 = loss_of(ref64(ids))
loss64.backward()
for n, p in ref64.named_parameters(remove_duplicate=False):
    if n in model16.sparsecc_masks:
        p.grad.mul_(model16.sparsecc_masks[n])
flat = lambda m: torch.cat([p.grad.double().flatten() for p in m.parameters()])
report16 = sparsecc.reports()[-1]
print(json.dumps({"losses": losses, "ref_losses": ref_losses, "param_diff": diff,
                  "bf16": {"loss": loss16.item(), "ref_loss": loss64.item(),
                           "grad_err": ((flat(model16) - flat(ref64)).norm() / flat(ref64).norm()).item(),
                           "sparse_ops": report16.stats.get("sparse_ops", 0), "refused": report16.stats.get("sparse_refused", 0)},
                  "ops": sorted(set(re.findall(r"sparsecc\.(\w+)\.default", graphs))),
                  "kernels": sorted(kernels.generated_sources()), "in_report": "@triton.jit" in html,
                  "dumped": sorted(p.name for p in (pathlib.Path(os.environ["SPARSECC_DEBUG_DIR"]) / "triton").iterdir())
                  }))
'''


def run_in_interpreter(script: str, tmp_path) -> dict:
    """Run script with the Triton path on CPU tensors; its last stdout line is JSON."""
    refusal = triton_cannot_interpret()
    if refusal:
        pytest.skip(refusal)
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "SPARSECC_TRITON": "1", "SPARSECC_DEBUG_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tests, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_ops(kernels: list[str]) -> set[str]:
    """The ops of generated kernel names (op_dtype_specialisations)."""
    return {re.sub(r"_(fp32|fp16|bf16)_.*", "", k) for k in kernels}


@pytest.mark.slow      # ~20 s: a subprocess interpreting every kernel
def test_sparse_transformer_trains_through_triton_kernels_in_the_interpreter(tmp_path):
    result = run_in_interpreter(SCRIPT, tmp_path)
    assert result["losses"] == pytest.approx(result["ref_losses"], rel=1e-5)
    assert result["param_diff"] < 1e-5
    # bfloat16 weights are rewritten too (3 blocks x (4 attention + 2 MLP linears) + the unstructured head);
    # the interpreter rounds fp32 -> bf16 towards zero (a GPU rounds to nearest), so ours errs up to ~2x eager bf16's
    bf16 = result["bf16"]
    assert (bf16["sparse_ops"], bf16["refused"]) == (19, 0), bf16
    assert bf16["loss"] == pytest.approx(bf16["ref_loss"], rel=1e-2)
    assert bf16["grad_err"] < 3e-2, bf16
    # every sparse format ran as a generated kernel: forward, input gradient, weight gradient; N:M on its own
    assert kernel_ops(result["kernels"]) >= {"block_spmm", "block_sddmm", "csr_spmm", "csr_sddmm", "nm_mm", "nm_mm_t",
                                             "nm_sddmm"}, result["kernels"]
    assert {"nm_mm", "nm_mm_t", "nm_sddmm", "csr_mm", "csr_mm_t", "csr_sddmm"} <= set(result["ops"]), result["ops"]
    # their source is in the report's HTML page and in SPARSECC_DEBUG_DIR
    assert result["in_report"]
    assert result["dumped"] == sorted(f"{k}.py" for k in result["kernels"])


CHANNELS_SCRIPT = r'''
import copy, json, re, torch, sparsecc
from models import make
from conftest import loss_of, reference_grads
from test_train_step import OPTIMIZERS, SCHEMES, data, reference_steps
from sparsecc.codegen import triton as kernels

scheme = SCHEMES["mlp"]["channels"]      # fc2.weight Channels(0.25) dim in; fc1.weight Channels(0.5) dim out, magnitude
result = {}
for opt_name, executor in (("sgd_momentum_wd", "eager"), ("adamw", "eager"), ("adamw", "inductor")):
    model, _ = make("mlp")
    x, y, loss_fn = data("mlp")
    ours, theirs = OPTIMIZERS[opt_name]
    ref = copy.deepcopy(model)
    ref_losses = reference_steps(ref, x, y, loss_fn, scheme, theirs, 2)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=ours, update=scheme, example_inputs=(x, y),
                                       executor=executor)
    losses = [step(x, y).item() for _ in range(2)]
    result[f"{opt_name}/{executor}"] = {
        "losses": losses, "ref_losses": [l.item() for l in ref_losses],
        "diff": max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))}
model, (x,) = make("mlp")
ref_loss, ref_grads = reference_grads(copy.deepcopy(model), (x,), scheme)
compiled = torch.compile(model, backend=sparsecc.backend(update=scheme, executor="eager"))
loss = loss_of(compiled(x))
loss.backward()
result["backend"] = {"losses": [loss.item()], "ref_losses": [ref_loss.item()],
                     "diff": max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()
                                 if ref_grads[n] is not None)}
result["backend_ops"] = sorted(set(re.findall(r"sparsecc\.(\w+)\.default",
                                              sparsecc.reports()[-1].graphs["backward/after"])))
result["kernels"] = sorted(kernels.generated_sources())
print(json.dumps(result))
'''


@pytest.mark.slow      # ~12 s: a subprocess interpreting every kernel
def test_channels_gradients_and_row_updates_run_generated_kernels_in_the_interpreter(tmp_path):
    result = run_in_interpreter(CHANNELS_SCRIPT, tmp_path)
    for run in ("sgd_momentum_wd/eager", "adamw/eager", "adamw/inductor", "backend"):
        assert result[run]["losses"] == pytest.approx(result[run]["ref_losses"], rel=1e-5), run
        assert result[run]["diff"] < 1e-6, (run, result[run]["diff"])
    assert "channels_weight_grad" in result["backend_ops"], result["backend_ops"]
    assert kernel_ops(result["kernels"]) == {"channels_wgrad", "sgd_rows", "adamw_rows"}, result["kernels"]


def train_step_graph(monkeypatch, triton: bool, optimizer) -> str:
    if triton:
        monkeypatch.setenv("SPARSECC_TRITON", "1")
    else:
        monkeypatch.delenv("SPARSECC_TRITON", raising=False)
    model, (x,) = make("mlp")
    y = x[:, :6]
    scheme = sparsecc.UpdateScheme({"fc2.weight": sparsecc.Channels(0.25), "fc3.*": "full",
                                    "fc1.weight": sparsecc.Channels(0.5, dim="out", select="magnitude")})
    step = sparsecc.compile_train_step(model, F.mse_loss, optimizer=optimizer, update=scheme, example_inputs=(x, y),
                                       executor="eager")
    return step.graph.code


@pytest.mark.parametrize("optimizer,update", [(sparsecc.SGD(lr=0.1, momentum=0.9), "sgd_rows"),
                                              (sparsecc.SGD(lr=0.1), "sgd_rows"),
                                              (sparsecc.AdamW(lr=0.01), "adamw_rows")])
def test_triton_path_graph_calls_the_channels_kernels(monkeypatch, optimizer, update):
    code = train_step_graph(monkeypatch, True, optimizer)
    assert code.count("sparsecc.channels_weight_grad.default(") == 2       # one per Channels weight
    assert code.count(f"sparsecc.{update}.default(") == 2                  # fc3 (full) keeps the aten update
    assert "aten.index_put_" not in code                                   # the kernels write the channels


def test_cpu_path_graph_stays_pure_aten(monkeypatch):
    code = train_step_graph(monkeypatch, False, sparsecc.AdamW(lr=0.01))
    assert set(re.findall(r"torch\.ops\.(\w+)\.", code)) == {"aten", "sparsecc"}
    assert set(re.findall(r"sparsecc\.(\w+)\.", code)) == {"index_constant"}   # fc1's magnitude-chosen channels


# ---- the cost model per device, and the autotuner (no GPU here: GPUs are described, their timings stubbed) -------

def _reference_block_spmm(x, values, dst, src, n_dst):
    b = values.shape[-1]
    y = x.new_zeros(x.shape[0], n_dst)
    for k, (d, s) in enumerate(zip(dst.tolist(), src.tolist())):
        y[:, d * b:(d + 1) * b] += x[:, s * b:(s + 1) * b] @ values[k].t()
    return y


def _reference_block_sddmm(g, x, rows, cols, b):
    return torch.stack([g[:, r * b:(r + 1) * b].t() @ x[:, c * b:(c + 1) * b] for r, c in zip(rows.tolist(),
                                                                                          cols.tolist())])


def test_cost_model_times_the_triton_launchers_on_the_triton_path(monkeypatch, tmp_path):
    """With SPARSECC_TRITON=1 the cost model times the generated kernels' launchers (the sparsecc:: ops dispatch to
    them), never the C++ kernels, and keeps those timings in a cache file of their own."""
    from sparsecc import cost_model
    from sparsecc.codegen import triton as T
    from sparsecc.ops import native
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSECC_TRITON", "1")
    calls = collections.Counter()

    def counted(name, fn):
        def launcher(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return launcher

    monkeypatch.setattr(T, "block_spmm", counted("block_spmm", _reference_block_spmm))
    monkeypatch.setattr(T, "block_sddmm", counted("block_sddmm", _reference_block_sddmm))
    for name in ("block_spmm", "block_sddmm", "csr_spmm", "csr_sddmm"):
        monkeypatch.setattr(native, name, lambda *a, **k: pytest.fail("a C++ kernel was timed on the Triton path"))
    (decision,) = cost_model.decide_all([cost_model.LinearShape(16, 64, 64, torch.float32, "blocks", 16, 0.25)])
    assert decision.speedup is not None
    assert calls["block_spmm"] >= 2 * 2 and calls["block_sddmm"] >= 2      # forward, input grad; weight grad
    (cache,) = tmp_path.glob("cost_model-*.json")
    monkeypatch.delenv("SPARSECC_TRITON")
    assert "-triton" in cache.name and cache.name != tuning.cache_file(tuning.device_info("cpu")).name   # not the C++ kernels' file


def _fake_gpu(monkeypatch, tmp_path):
    """The cost model seeing an H200 as cuda:0 (no CUDA call is made for it)."""
    from sparsecc import cost_model
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    gpu = tuning.DeviceInfo("cuda:0", "NVIDIA H200", (9, 0), True, "NVIDIA-H200-cc90-torchX-tritonY")
    real = cost_model.device_info
    monkeypatch.setattr(cost_model, "device_info", lambda d=None: gpu if str(d).startswith("cuda") else real(d))
    return cost_model, gpu


def test_gpu_decisions_are_measured_on_the_gpu_never_taken_from_cpu_timings(monkeypatch, tmp_path):
    cost_model, gpu = _fake_gpu(monkeypatch, tmp_path)
    monkeypatch.delenv("SPARSECC_TRITON", raising=False)
    shape = cost_model.LinearShape(4096, 4096, 4096, torch.bfloat16, "blocks", 64, 0.1)
    cpu_cache = tuning.cache_file(tuning.device_info())
    cpu_cache.parent.mkdir(parents=True, exist_ok=True)
    cpu_cache.write_text(json.dumps({shape.key(): [100.0, 1.0]}))   # the CPU: sparse 100x faster
    measured = []
    monkeypatch.setattr(cost_model, "measure", lambda s: measured.append(s.device) or (0.25, 0.5))
    with cost_model.compiling("cuda:0"):               # what the backend sets from CUDA parameters
        (decision,) = cost_model.decide_all([shape])
    assert measured == ["cuda:0"]
    assert not decision.rewrite and "NVIDIA H200" in decision.reason and "0.50x" in decision.reason
    gpu_cache = json.loads((tmp_path / f"cost_model-{gpu.setup}.json").read_text())
    assert gpu_cache == {shape.key(): [0.25, 0.5]}
    assert cost_model.decide_all([shape])[0].rewrite   # outside the compilation: the CPU's own (cached) answer


def test_cost_model_refuses_what_cannot_run_on_the_device_with_the_reason(monkeypatch, tmp_path):
    from sparsecc.ops import semi_structured
    cost_model, gpu = _fake_gpu(monkeypatch, tmp_path)
    monkeypatch.setattr(cost_model, "measure", lambda s: pytest.fail("nothing to measure"))
    (f64,) = cost_model.decide_all([cost_model.LinearShape(64, 64, 64, torch.float64, "blocks", 16, 0.25, "cuda:0")])
    assert not f64.rewrite and "take float32/float16/bfloat16, not float64" in f64.reason
    # 2:4 sparse tensor cores: fp16/bf16 on a CUDA GPU only; the reason is in the decision
    assert "need a CUDA GPU" in semi_structured.available("cpu", torch.bfloat16)[1]
    assert "float16/bfloat16 operands, not float32" in semi_structured.available("cuda:0", torch.float32)[1]
    monkeypatch.setattr(cost_model, "measure", lambda s: (1.0, 10.0, "ell"))      # the N:M kernels: 10x slower
    with cost_model.compiling("cuda:0", {(64, 64): sparsecc.NM(2, 4, transposable=True)}):
        shape = cost_model.resolve(cost_model.LinearShape(32, 64, 64, torch.float32, "csr", 1, 0.5))
        (nm,) = cost_model.decide_all([shape])
    assert shape.pattern == "2:4T" and "nm2:4T" in shape.key()
    assert not nm.rewrite and "not float32" in nm.reason and "not faster" in nm.reason
    # on the CPU an N:M weight stays what it always was there: CSR, same cache key
    with cost_model.compiling("cpu", {(64, 64): sparsecc.NM(2, 4)}):
        assert cost_model.resolve(cost_model.LinearShape(32, 64, 64, torch.float32, "csr", 1, 0.5)).pattern is None


def test_backend_hands_the_parameters_device_and_nm_patterns_to_the_cost_model(monkeypatch, tmp_path):
    from sparsecc import cost_model
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    seen = []
    real = cost_model.compiling

    def spy(device, nm_patterns=None):
        seen.append((str(device), dict(nm_patterns or {})))
        return real(device, nm_patterns)

    monkeypatch.setattr(cost_model, "compiling", spy)
    monkeypatch.setattr(cost_model, "measure", lambda s: (s.device == "cpu" or pytest.fail(s.device)) and (2.0, 1.0))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    spec = sparsecc.Sparsity({"0.weight": sparsecc.NM(2, 4, transposable=True), "2.weight": sparsecc.Blocks(8, 0.5)})
    sparsecc.sparsify(model, spec)
    compiled = torch.compile(model, backend=sparsecc.backend(sparsity=spec, executor="eager"))
    compiled(torch.randn(4, 16)).sum().backward()
    assert seen == [("cpu", {(32, 16): sparsecc.NM(2, 4, transposable=True)})]
    assert model[0].weight.grad[~model.sparsecc_masks["0.weight"]].abs().max() == 0


def test_channels_weight_grad_takes_the_kernel_off_the_gpu():
    g, x = torch.randn(8, 4), torch.randn(8, 6)
    assert tuning.channels_choice(g, x, 3, "in", lambda: pytest.fail(), lambda: pytest.fail()) == "kernel"
    assert tuning.sddmm_choice("csr_sddmm", (g, x, None, torch.zeros(5)), lambda: pytest.fail(),
                               lambda: pytest.fail()) == "kernel"


def test_fastest_times_each_way_once_per_device_and_remembers_it_on_disk(monkeypatch, tmp_path):
    """On a GPU (faked: its setup and timer) fastest() times every option at the first call of a key, keeps the
    fastest in the device's measurement file, and answers from memory, then from the file (fastest_known too)."""
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    fake = tuning.DeviceInfo("cuda:0", "FakeGPU", (9, 0), True, "FakeGPU-cc90-torchX-tritonY")
    monkeypatch.setattr(tuning, "device_info", lambda device=None: fake)
    monkeypatch.setattr(tuning, "gpu_median_ms", lambda fn, device, budget: fn())
    monkeypatch.setattr(tuning, "_FASTEST", {})
    cuda, key = torch.device("cuda"), "block_sddmm 4096x4096x4096 b64 nnz=409 bfloat16"
    assert tuning.fastest_known(cuda, key) is None
    assert tuning.fastest(cuda, key, {"kernel": lambda: 0.30, "gemm": lambda: 0.25}) == "gemm"
    assert json.loads(tuning.cache_file(fake).read_text())[key] == {"kernel": 0.30, "gemm": 0.25}
    assert tuning.fastest(cuda, key, {"kernel": pytest.fail, "gemm": pytest.fail}) == "gemm"   # from memory
    monkeypatch.setattr(tuning, "_FASTEST", {})                                             # a new process
    assert tuning.fastest_known(cuda, key) == "gemm"
    assert tuning.fastest(cuda, key, {"kernel": pytest.fail, "gemm": pytest.fail}) == "gemm"   # from the file
    assert tuning.fastest_known(torch.device("cpu"), key) is None


def _sparse_weight(pattern, out=24, inp=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen)
    mask = pattern.mask(w)
    sw = SparseWeight.create("w", pattern, mask, torch.float32)
    return sw.index, mask, torch.randn(10, out, generator=gen), torch.randn(10, inp, generator=gen)


@pytest.mark.parametrize("pattern", [sparsecc.Blocks(8, 0.5), sparsecc.NM(2, 4), sparsecc.Unstructured(0.3)],
                         ids=["blocks", "nm", "csr"])
def test_weight_gradient_as_dense_gemm_and_gather_keeps_the_entries_in_the_kernels_order(pattern, monkeypatch):
    """The GPU's other way to a sparse weight gradient (cuBLAS's g^T @ x, the kept entries gathered) returns the
    entries in the order the SDDMM kernels do: the dense gradient at the support, in the format's value order."""
    from sparsecc.ops import block_sparse, csr
    index, mask, g, x = _sparse_weight(pattern)
    ops = torch.ops.sparsecc
    if isinstance(pattern, sparsecc.Blocks):
        call = lambda: ops.block_sddmm(g, x, index["rows"], index["cols"], 8)   # noqa: E731
        want = block_sparse.to_blocks(g.t() @ x, mask, 8)[0]
    else:
        call = (lambda: ops.nm_sddmm(g, x, index["crow"], index["col"], 4)) if isinstance(pattern, sparsecc.NM) \
            else (lambda: ops.csr_sddmm(g, x, index["crow"], index["col"]))
        want = (g.t() @ x).flatten()[index["flat"]]
    for module in (block_sparse, csr):
        monkeypatch.setattr(module, "use_triton", lambda t: True)      # the Triton path's dispatch, on the CPU
    monkeypatch.setattr(tuning, "fastest", lambda device, key, options: "gemm")
    torch.testing.assert_close(call(), want)


def test_memory_model_counts_the_dense_gradient_of_a_gemm_weight_gradient(monkeypatch):
    """kernel_workspace: a weight gradient measured faster as GEMM + gather on a GPU holds the dense [out, in]
    gradient while it runs (and CSR's row of each nonzero); the SDDMM kernel, or no measurement yet, nothing."""
    from sparsecc import memory
    index, mask, g, x = _sparse_weight(sparsecc.Unstructured(0.3))
    args = (g.bfloat16(), x.bfloat16(), index["crow"], index["col"])
    cuda, op = torch.device("cuda"), torch.ops.sparsecc.csr_sddmm.default
    choice = {}
    monkeypatch.setattr(tuning, "fastest_known", lambda device, key: choice.get(key))
    assert memory.kernel_workspace(op, args, {}, cuda) == 0
    choice[tuning.sddmm_key("csr_sddmm", *args)] = "gemm"
    assert memory.kernel_workspace(op, args, {}, cuda) == 24 * 32 * 2 + index["col"].shape[0] * 8
    choice[tuning.sddmm_key("csr_sddmm", *args)] = "kernel"
    assert memory.kernel_workspace(op, args, {}, cuda) == 0
    blocks, _, _, _ = _sparse_weight(sparsecc.Blocks(8, 0.5))
    args = (g, x, blocks["rows"], blocks["cols"], 8)
    choice[tuning.sddmm_key("block_sddmm", *args)] = "gemm"
    assert memory.kernel_workspace(torch.ops.sparsecc.block_sddmm.default, args, {}, cuda) == 24 * 32 * 4


def test_autotuner_times_each_candidate_once_and_keeps_the_fastest_on_disk(monkeypatch, tmp_path, capsys):
    from sparsecc.codegen.triton import tune
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSECC_PROGRESS", "1")
    monkeypatch.setattr(tune, "device_key", lambda device: "FakeGPU-cc90-torchX-tritonY")
    ms = {"a": 3.0, "b": 1.0, "c": 2.0}

    def launch(src, cfg):
        if src == "d":
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return src
    monkeypatch.setattr(tune, "gpu_median_ms", lambda fn, device, budget_ms: ms[fn()])
    variants = [("a", {"BLOCK_M": 64}), ("b", {"BLOCK_M": 128}), ("c", {"BLOCK_M": 256}), ("d", {"BLOCK_M": 512})]
    assert tune.pick("block_spmm bf16 b64 N4096", variants, launch, torch.device("cpu"))[0] == "b"
    # every candidate's time, and why one could not run, are in the progress line (a GPU log shows the table)
    assert ('tuned block_spmm bf16 b64 N4096: fastest 1.000 ms {"BLOCK_M": 128}; 2.000 ms {"BLOCK_M": 256}; '
            '3.000 ms {"BLOCK_M": 64}; failed {"BLOCK_M": 512}: RuntimeError: out of resource: shared memory'
            in capsys.readouterr().err)
    tune._MEMO.clear()                                 # a new process: the answer comes from the disk cache
    run = lambda src, cfg: pytest.fail("timed again")  # noqa: E731
    assert tune.pick("block_spmm bf16 b64 N4096", variants, run, torch.device("cpu")) == variants[1]
    cached = json.loads(tune.cache_file(torch.device("cpu")).read_text())
    assert cached == {"block_spmm bf16 b64 N4096": {"BLOCK_M": 128}}
    monkeypatch.setenv("SPARSECC_TRITON_TUNE", "0")
    assert tune.pick("other", variants, run, torch.device("cpu")) == variants[0]
