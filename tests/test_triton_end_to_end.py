"""A transformer with sparse weights and a mixed update scheme, trained through the backend with every sparsecc::
op running as a generated Triton kernel (SPARSECC_TRITON=1 on CPU tensors, in Triton's interpreter), matches
the dense masked reference. In a subprocess: TRITON_INTERPRET must be set before triton is imported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import copy, json, os, pathlib, torch, sparsecc
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
print(json.dumps({"losses": losses, "ref_losses": ref_losses, "param_diff": diff,
                  "kernels": sorted(kernels.generated_sources()), "in_report": "@triton.jit" in html,
                  "dumped": sorted(p.name for p in (pathlib.Path(os.environ["SPARSECC_DEBUG_DIR"]) / "triton").iterdir())}))
'''


def test_sparse_transformer_trains_through_triton_kernels_in_the_interpreter(tmp_path):
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "SPARSECC_TRITON": "1", "SPARSECC_DEBUG_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tests, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["losses"] == pytest.approx(result["ref_losses"], rel=1e-5)
    assert result["param_diff"] < 1e-5
    # every sparse format ran as a generated kernel: block and CSR forward, input gradient, weight gradient
    names = " ".join(result["kernels"])
    for kind in ("block_spmm", "block_sddmm", "csr_spmm", "csr_sddmm"):
        assert kind in names, f"no generated {kind} kernel ran: {result['kernels']}"
    # their source is in the report's HTML page and in SPARSECC_DEBUG_DIR
    assert result["in_report"]
    assert result["dumped"] == sorted(f"{k}.py" for k in result["kernels"])
