"""Compiled graphs on the Triton path (SPARSECC_TRITON=1 on CPU tensors, kernels run in Triton's interpreter) match
eager references:
- a transformer with sparse weights (blocks, N:M, unstructured) and a mixed update scheme, trained through the
  backend: every sparsecc:: op runs as a generated kernel (N:M weights on the N:M ELL kernels);
- Channels rules: the sliced weight gradient runs as the generated channels_weight_grad kernel (through the backend
  and in compile_train_step) and compile_train_step's update of the trained channels as sgd_rows / adamw_rows.
In subprocesses: TRITON_INTERPRET must be set before triton is imported. The structural tests need no interpreter:
they only compile."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

import sparsecc
from models import make

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
print(json.dumps({"losses": losses, "ref_losses": ref_losses, "param_diff": diff,
                  "ops": sorted(set(re.findall(r"sparsecc\.(\w+)\.default", graphs))),
                  "kernels": sorted(kernels.generated_sources()), "in_report": "@triton.jit" in html,
                  "dumped": sorted(p.name for p in (pathlib.Path(os.environ["SPARSECC_DEBUG_DIR"]) / "triton").iterdir())
                  }))
'''


def run_in_interpreter(script: str, tmp_path) -> dict:
    """Run script with the Triton path on CPU tensors; its last stdout line is JSON."""
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


def test_sparse_transformer_trains_through_triton_kernels_in_the_interpreter(tmp_path):
    result = run_in_interpreter(SCRIPT, tmp_path)
    assert result["losses"] == pytest.approx(result["ref_losses"], rel=1e-5)
    assert result["param_diff"] < 1e-5
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
