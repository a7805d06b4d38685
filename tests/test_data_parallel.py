"""compile_train_step(..., process_group=...): 2 ranks (gloo, CPU, spawned processes) train exactly like one
process on the global batch, and each step all-reduces exactly the trained elements."""
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import sparsecc
from models import make
from test_train_step import OPTIMIZERS, SCHEMES, reference_steps

WORLD = 2


def global_batch(model_name):
    """(float64 model, x, y, loss_fn) with a global batch that splits evenly over WORLD ranks."""
    model, _ = make(model_name)
    model.double()
    g = torch.Generator().manual_seed(3)
    if model_name == "mlp":
        return model, torch.randn(8, 12, generator=g, dtype=torch.float64), \
            torch.randn(8, 6, generator=g, dtype=torch.float64), F.mse_loss
    ids = torch.randint(0, 40, (4, 16), generator=g)
    return model, ids, torch.randint(0, 40, (4, 16), generator=g), \
        lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())


def join_as_rank(rank: int, world: int, port: str, model_name: str):
    """In a worker process: join the gloo group; (model, this rank's x and y, loss_fn)."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, x, y, loss_fn = global_batch(model_name)
    share = x.shape[0] // world
    return model, x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share], loss_fn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, *args, worker="dp_worker.py") -> list[tuple[dict, dict]]:
    """Run the worker script on WORLD ranks; per rank (json record, parameters)."""
    tests = Path(__file__).parent
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(tests / worker), str(r), str(WORLD), port,
                               *map(str, args), str(tmp_path)], cwd=tests, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(WORLD)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [(json.loads((tmp_path / f"rank{r}.json").read_text()),
             safetensors.torch.load_file(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]


def ideal_bytes(model, scheme) -> int:
    """The trained elements (k channels of a Channels weight) times the element size."""
    rules = scheme.resolve(dict(model.named_parameters()))
    total = 0
    for name, p in model.named_parameters():
        rule = rules[name]
        if rule == "full":
            total += p.numel() * p.element_size()
        elif isinstance(rule, sparsecc.Channels):
            total += p.numel() // p.shape[rule.axis] * rule.count(p.shape[rule.axis]) * p.element_size()
    return total


CASES = [("mlp", "mixed", "adamw", "eager", 25), ("mlp", "channels", "sgd_momentum_wd", "eager", 1e-4),
         ("transformer", "mixed", "adamw", "eager", 1e-4), ("transformer", "mixed", "adamw", "inductor", 25)]


@pytest.mark.slow
@pytest.mark.parametrize("model_name,scheme,opt,executor,bucket_mb", CASES)
def test_two_ranks_train_like_one_process_on_the_global_batch(tmp_path, model_name, scheme, opt, executor, bucket_mb):
    ranks = run_ranks(tmp_path, model_name, scheme, opt, executor, bucket_mb)
    model, x, y, loss_fn = global_batch(model_name)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    ref_losses = reference_steps(ref, x, y, loss_fn, SCHEMES[model_name][scheme], OPTIMIZERS[opt][1], 3)
    # the global mean loss is the mean of the ranks' local mean losses (equal local batches)
    mean_losses = torch.tensor([sum(r[0]["losses"][i] for r in ranks) / WORLD for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(mean_losses, torch.stack(ref_losses), rtol=1e-10, atol=1e-12)
    (_, params0), (_, params1) = ranks
    rules = SCHEMES[model_name][scheme].resolve(dict(model.named_parameters()))
    for name, p in ref.named_parameters():
        assert torch.equal(params0[name], params1[name]), f"{name} differs between the ranks"
        if rules[name] == "frozen":
            assert torch.equal(params0[name], initial[name]), f"frozen {name} changed"
        torch.testing.assert_close(params0[name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)
    counts = ranks[0][0]["counts"]
    assert counts["bytes_all_reduced"] == ideal_bytes(model, SCHEMES[model_name][scheme])
    trained = sum(rules[n] != "frozen" for n in rules)
    assert counts["buckets"] == (1 if bucket_mb >= 1 else trained)       # tiny buckets: one per gradient
    assert "artifacts are single-process" in ranks[0][0]["save_refused"]


def test_a_process_group_needs_torch_distributed_initialised():
    model, x, y, loss_fn = global_batch("mlp")
    with pytest.raises(sparsecc.ConfigError, match=r"needs torch.distributed initialised first"):
        sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(0.1), example_inputs=(x, y),
                                    process_group=object(), executor="eager")
    with pytest.raises(sparsecc.ConfigError, match=r"bucket_cap_mb must be a number > 0"):
        sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.SGD(0.1), example_inputs=(x, y),
                                    bucket_cap_mb=0, executor="eager")


FSDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import sparsecc
from models import MLP
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
scheme = sparsecc.UpdateScheme({"fc3.*": "full"})
x = torch.randn(4, 12)
torch.manual_seed(0)
per_layer = MLP()
for layer in (per_layer.fc1, per_layer.fc2, per_layer.fc3):
    fully_shard(layer)
fully_shard(per_layer)
try:
    torch.compile(per_layer, backend="sparsecc", options={"update": scheme})(x).sum().backward()
    print("PER-LAYER TRAINED")
except Exception as e:
    print("PER-LAYER REFUSED", type(e).__name__, str(e).replace(chr(10), " "))
torch.manual_seed(0)
root = MLP()
fully_shard(root)
torch.compile(root, backend="sparsecc", options={"update": scheme})(x).sum().backward()
print("ROOT GRADS", sorted(n for n, p in root.named_parameters() if p.grad is not None))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_per_layer_sharding_is_refused_and_root_sharding_keeps_the_scheme():
    tests = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(free_port())], cwd=tests, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tests)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PER-LAYER TRAINED" not in out.stdout
    assert "PER-LAYER REFUSED" in out.stdout and "FSDP2 fully_shard on submodules" in out.stdout
    assert "Shard only the root module" in out.stdout
    assert "ROOT GRADS ['fc3.bias', 'fc3.weight']" in out.stdout


def test_scheme_trained_lists_each_trained_parameter_once_tied_included():
    model, _ = make("transformer")                    # head.weight is embed.weight
    scheme = sparsecc.UpdateScheme({"head.weight": "full", "blocks.2.mlp.fc1.weight": sparsecc.Channels(0.25),
                                    "ln_f.*": "full"})
    trained = scheme.trained(model)
    assert [id(p) for p in trained] == [id(model.embed.weight), id(model.blocks[2].mlp.fc1.weight),
                                        id(model.ln_f.weight), id(model.ln_f.bias)]


@pytest.mark.slow
@pytest.mark.parametrize("model_name,scheme", [("mlp", "mixed"), ("transformer", "channels")])
def test_ddp_with_the_trained_only_hook_sends_the_trained_elements_and_trains_exactly(tmp_path, model_name, scheme):
    """torch.compile(DDP(model), backend="sparsecc") + sparsecc.ddp_trained_only: equal to one process on the
    global batch (plain SGD on scheme.trained(model)), and each step all-reduces exactly the trained elements."""
    ranks = run_ranks(tmp_path, model_name, scheme, 1, worker="ddp_worker.py")
    model, x, y, loss_fn = global_batch(model_name)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    ref_losses = reference_steps(ref, x, y, loss_fn, SCHEMES[model_name][scheme], OPTIMIZERS["sgd"][1], 3)
    mean_losses = torch.tensor([sum(r[0]["losses"][i] for r in ranks) / WORLD for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(mean_losses, torch.stack(ref_losses), rtol=1e-10, atol=1e-12)
    rules = SCHEMES[model_name][scheme].resolve(dict(model.named_parameters()))
    (_, params0), (_, params1) = ranks
    for name, p in ref.named_parameters():
        assert torch.equal(params0[name], params1[name]), f"{name} differs between the ranks"
        if rules[name] == "frozen":
            assert torch.equal(params0[name], initial[name]), f"frozen {name} changed"
        torch.testing.assert_close(params0[name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)
    assert ranks[0][0]["bytes_sent"] == 3 * ideal_bytes(model, SCHEMES[model_name][scheme])


def test_the_ddp_hook_refuses_what_is_not_a_ddp_model():
    model, _ = make("mlp")
    with pytest.raises(sparsecc.ConfigError, match=r"needs a DistributedDataParallel model, got MLP"):
        sparsecc.ddp_trained_only(model, SCHEMES["mlp"]["mixed"])
