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


def sgd_steps_and_record(model, trained, x, y, loss_fn, out, rank, bytes_sent) -> None:
    """In a worker process: 3 SGD steps of `trained` (the wrapped model) on every parameter of model (an
    optimizer skips a parameter whose .grad is None); writes the full parameters and a json record for run_ranks."""
    import torch.distributed as dist
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, with_grad = [], set()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(trained(x), y)
        loss.backward()
        with_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(float(loss))
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()   # FSDP2: DTensors
              for n, p in model.named_parameters()}
    safetensors.torch.save_file(params, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "bytes_sent": bytes_sent(), "with_grad": sorted(with_grad)}, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # the record is written: skip the interpreter's teardown, where gloo's worker threads can abort the process
    # ("terminate called without an active exception"; once in CI under FSDP2, cf. pytorch/pytorch#179291)
    os._exit(0)


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
         pytest.param("transformer", "mixed", "adamw", "inductor", 1e-4, marks=pytest.mark.skipif(
             torch.__version__ < "2.13", reason="torch 2.11's Inductor cannot train float64 attention on the CPU "
             "(plain torch.compile too: the SDPA backward gets a float32 buffer)"))]


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
late = MLP()                                   # per layer after torch.compile: refused the same way
late_compiled = torch.compile(late, backend="sparsecc", options={"update": scheme})
for layer in (late.fc1, late.fc2, late.fc3):
    fully_shard(layer)
fully_shard(late_compiled)
try:
    late_compiled(x).sum().backward()
    print("LATE TRAINED")
except Exception as e:
    print("LATE REFUSED", "FSDP2 fully_shard on submodules" in str(e))
try:
    sparsecc.fully_shard(per_layer, scheme)
except sparsecc.ConfigError as e:
    print("RESHARD REFUSED", str(e))
try:
    sparsecc.compile_train_step(per_layer, lambda out, y: out.sum(), optimizer=sparsecc.SGD(0.1), update=scheme,
                                example_inputs=(x,), executor="eager")
    print("STEP TRAINED")
except sparsecc.ConfigError as e:
    print("STEP REFUSED", str(e).replace(chr(10), " "))
from sparsecc.distributed import TrainedOnlyReduceScatter
a, b = torch.zeros(4, 3), torch.zeros(8, 3)             # one rank: each path must return its input's trained part
for parts, packed in (({id(a): None, id(b): (0, torch.tensor([1, 6]))}, False),   # 18 of 36: plain reduce-scatter
                      ({id(b): (1, torch.tensor([2]))}, True)):                     # 8 of 24 (a frozen): packed
    comm = TrainedOnlyReduceScatter([(a, (4, 3), 0), (b, (8, 3), 0)], parts)
    grads = torch.arange(36.0) if id(a) in parts else torch.arange(24.0)
    out = torch.full_like(grads, -1.0)
    comm(out, grads.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
    want = grads if not packed else torch.zeros(8, 3).index_fill_(1, torch.tensor([2]), 1).flatten() * grads
    print("COMM", packed, comm.bytes_sent == (32 if packed else 144), torch.equal(out, want))
torch.manual_seed(0)
root = MLP()
fully_shard(root)
torch.compile(root, backend="sparsecc", options={"update": scheme})(x).sum().backward()
print("ROOT GRADS", sorted(n for n, p in root.named_parameters() if p.grad is not None))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_per_layer_sharding_is_refused_and_root_sharding_keeps_the_scheme():
    """Under the backend and in compile_train_step: refused with what to do instead; root sharding works."""
    tests = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(free_port())], cwd=tests, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tests)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PER-LAYER TRAINED" not in out.stdout
    assert "PER-LAYER REFUSED" in out.stdout and "FSDP2 fully_shard on submodules" in out.stdout
    assert "LATE REFUSED True" in out.stdout
    assert "Shard only the root module" in out.stdout
    assert "ROOT GRADS ['fc3.bias', 'fc3.weight']" in out.stdout
    assert "COMM False True True" in out.stdout and "COMM True True True" in out.stdout
    assert "STEP REFUSED compile_train_step cannot train an FSDP2-sharded model (FSDPLinear, FSDPMLP hold" in out.stdout
    assert "RESHARD REFUSED sparsecc.fully_shard shards the root module itself, but FSDPLinear, FSDPMLP are " \
           "already fully_shard'ed" in out.stdout


def test_scheme_trained_lists_each_trained_parameter_once_tied_included():
    model, _ = make("transformer")                    # head.weight is embed.weight
    scheme = sparsecc.UpdateScheme({"head.weight": "full", "blocks.2.mlp.fc1.weight": sparsecc.Channels(0.25),
                                    "ln_f.*": "full"})
    trained = scheme.trained(model)
    assert [id(p) for p in trained] == [id(model.embed.weight), id(model.blocks[2].mlp.fc1.weight),
                                        id(model.ln_f.weight), id(model.ln_f.bias)]


@pytest.mark.slow
@pytest.mark.parametrize("model_name,scheme,order,find_unused", [("mlp", "mixed", "compile(dp)", 0),
                                                                 ("transformer", "mixed", "dp(compile)", 1)])
def test_data_parallel_sends_the_trained_elements_and_trains_exactly(tmp_path, model_name, scheme, order, find_unused):
    """sparsecc.data_parallel under the sparsecc backend, both wrap orders: equal to one process on the global
    batch (plain SGD on every parameter), frozen parameters never get a .grad, and each step all-reduces
    exactly the trained elements."""
    ranks = run_ranks(tmp_path, model_name, scheme, order, find_unused, worker="ddp_worker.py")
    model, x, y, loss_fn = global_batch(model_name)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    ref_losses = reference_steps(ref, x, y, loss_fn, SCHEMES[model_name][scheme], OPTIMIZERS["sgd"][1], 3)
    mean_losses = torch.tensor([sum(r[0]["losses"][i] for r in ranks) / WORLD for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(mean_losses, torch.stack(ref_losses), rtol=1e-10, atol=1e-12)
    rules = SCHEMES[model_name][scheme].resolve(dict(model.named_parameters()))
    (record, params0), (_, params1) = ranks
    assert record["with_grad"] == sorted(n for n, p in model.named_parameters() if rules[n] != "frozen")
    for name, p in ref.named_parameters():
        assert torch.equal(params0[name], params1[name]), f"{name} differs between the ranks"
        if rules[name] == "frozen":
            assert torch.equal(params0[name], initial[name]), f"frozen {name} changed"
        torch.testing.assert_close(params0[name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)
    assert record["bytes_sent"] == 3 * ideal_bytes(model, SCHEMES[model_name][scheme])


@pytest.mark.slow
@pytest.mark.parametrize("model_name,order", [("mlp", "compile(shard)"), ("transformer", "shard(compile)")])
def test_fsdp2_root_sharding_trains_like_one_process_and_reduces_only_trained_elements(tmp_path, model_name, order):
    ranks = run_ranks(tmp_path, model_name, "mixed", order, worker="fsdp_worker.py")
    model, x, y, loss_fn = global_batch(model_name)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    scheme = SCHEMES[model_name]["mixed"]
    ref_losses = reference_steps(ref, x, y, loss_fn, scheme, OPTIMIZERS["sgd"][1], 3)
    mean_losses = torch.tensor([sum(r[0]["losses"][i] for r in ranks) / WORLD for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(mean_losses, torch.stack(ref_losses), rtol=1e-10, atol=1e-12)
    rules = scheme.resolve(dict(model.named_parameters()))
    (record, params0), (_, params1) = ranks
    assert record["with_grad"] == sorted(n for n in rules if rules[n] != "frozen")     # frozen: .grad stays None
    for name, p in ref.named_parameters():
        assert torch.equal(params0[name], params1[name]), f"{name} differs between the ranks"
        if rules[name] == "frozen":
            assert torch.equal(params0[name], initial[name]), f"frozen {name} changed"
        torch.testing.assert_close(params0[name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)
    # FSDP2's own reduce-scatter sends every gradient it packs (dim 0 padded to the world size), Channels weights
    # whole; the trained elements alone go as an all-reduce, which a ring pays twice: only when under half
    packed = sum(-(-p.shape[0] // WORLD) * WORLD * p[0].numel() * p.element_size()
                 for n, p in model.named_parameters() if rules[n] != "frozen")
    assert 2 * ideal_bytes(model, scheme) < packed           # both schemes: mostly Channels by element count
    assert record["bytes_sent"] == 3 * ideal_bytes(model, scheme)


NAMING_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import sparsecc
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)

class Net(torch.nn.Module):            # 1.4 MB per layer: DDP's 1 MB buckets make Dynamo split the graph
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.ModuleList([torch.nn.Linear(600, 600) for _ in range(3)])
    def forward(self, x):
        for layer in self.fc:
            x = torch.relu(layer(x))
        return x

def attempt(what, fn):
    torch._dynamo.reset()
    try:
        fn()
        print(what, "OK")
    except Exception as e:
        cause = e
        while getattr(cause, "inner_exception", None) is not None:   # torch.compile wraps backend errors,
            cause = cause.inner_exception                           # DDPOptimizer once more
        print(what, type(cause).__name__, str(cause).splitlines()[0])

x = torch.randn(4, 600)
def backend(pattern, wrap):
    model = Net()
    options = {"update": sparsecc.UpdateScheme({pattern: "full"}), "executor": "eager"}
    torch.compile(wrap(model, options["update"]), backend="sparsecc", options=options)(x).sum().backward()
by_hand = lambda m, scheme: DDP(m, bucket_cap_mb=1)
ours = lambda m, scheme: sparsecc.data_parallel(m, scheme, bucket_cap_mb=1)
attempt("MISSPELLED", lambda: backend("fc.9.*", ours))
attempt("PREFIXED", lambda: backend("module.fc.2.*", ours))
attempt("BY HAND", lambda: backend("fc.2.*", by_hand))
attempt("OURS", lambda: backend("fc.2.*", ours))
step = sparsecc.compile_train_step(DDP(Net(), bucket_cap_mb=3), lambda out, y: out.sum(), optimizer=sparsecc.SGD(0.1),
                                   update=sparsecc.UpdateScheme({"fc.2.*": "full"}), example_inputs=(x,), executor="eager")
print("STEP COMM", step.comm)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_patterns_name_the_models_own_parameters_under_ddp_and_hand_built_ddp_is_refused():
    """Dynamo splits the graph at DDP's buckets: a pattern matching nothing in the whole model is still an error;
    a 'module.' prefix gets the hint; a DDP built by hand (reducing frozen gradients) is refused;
    compile_train_step(DDP(model)) takes own names and DDP's group and bucket size."""
    tests = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", NAMING_SCRIPT, str(free_port())], cwd=tests, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("MISSPELLED", "PREFIXED",
                                                                                              "BY", "OURS", "STEP")))
    assert lines["MISSPELLED"] == "ConfigError UpdateScheme pattern 'fc.9.*' matches no parameter. Did you mean: " \
                                  "'fc.2.bias', 'fc.1.bias', 'fc.0.bias'?"
    assert "write 'fc.2.*', without 'module.'" in lines["PREFIXED"]
    assert lines["BY"].startswith("HAND ConfigError this DistributedDataParallel would all-reduce the gradients of 4 "
                                  "frozen parameters (fc.0.weight, fc.0.bias, fc.1.weight, ...)")
    assert "sparsecc.data_parallel(model, scheme" in lines["BY"]
    assert lines["OURS"] == "OK"
    assert lines["STEP"] == f"COMM ('0', 1, {3 * 2 ** 20})"


def test_data_parallel_and_fully_shard_refuse_bad_input_and_change_nothing():
    model, _ = make("mlp")
    with pytest.raises(sparsecc.ConfigError, match=r"needs an UpdateScheme, got dict"):
        sparsecc.data_parallel(model, {"fc3.*": "full"})
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    with pytest.raises(sparsecc.ConfigError, match=r"wraps the model in DistributedDataParallel itself; pass the model"):
        sparsecc.data_parallel(ddp, SCHEMES["mlp"]["mixed"])
    with pytest.raises(sparsecc.ConfigError, match=r"sparsecc.fully_shard needs an UpdateScheme, got dict"):
        sparsecc.fully_shard(model, {"fc3.*": "full"})
    with pytest.raises(sparsecc.ConfigError, match=r"matches no parameter"):
        sparsecc.fully_shard(model, sparsecc.UpdateScheme({"fc9.*": "full"}))
    with pytest.raises(TypeError, match="reshard_after_forwrd"):       # FSDP2's own error, passed through
        sparsecc.fully_shard(model, SCHEMES["mlp"]["mixed"], reshard_after_forwrd=True)
    assert all(p.requires_grad for p in model.parameters())          # nothing was changed
