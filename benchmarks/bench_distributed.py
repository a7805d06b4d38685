"""Data-parallel training under a sparse-update scheme: step time and bytes all-reduced per step, measured on 2
processes (gloo, CPU, one thread each), side by side in one run; then the communication time per step
projected for the 6.7 B-parameter GPT of ../shared/gpu/README.md at 8, 64 and 512 ranks.

Measured variants (the benchmark transformer of bench_sparse_update.py: 6 layers, d=256, vocab 512, 8x128
tokens split over the ranks; scheme: biases of the upper half, Channels(0.25) on three MLP weights, final
norm, head; AdamW):
  ddp-full             DDP, every parameter trained, eager
  ddp-freeze           DDP with requires_grad_(False) on every tensor the scheme does not touch, eager
  ddp-freeze-inductor  the same, torch.compile(ddp) with Inductor (Dynamo's DDPOptimizer)
  sparsecc-backend     torch.compile(sparsecc.data_parallel(model, scheme), backend="sparsecc")
  sparsecc             sparsecc.compile_train_step(..., process_group=WORLD): one graph, collectives inside
  fsdp2-freeze         FSDP2 fully_shard on the root with that freezing, eager
  sparsecc-fsdp2       torch.compile(sparsecc.fully_shard(model, scheme), backend="sparsecc")
Bytes are counted where they are sent: a counting DDP communication hook for the DDP variants, the hook's own
counter for sparsecc.data_parallel, the graph's all-reduce sizes for the one-graph step; for FSDP2 a counting
reduce-scatter comm (its input: every gradient FSDP2 packs) and sparsecc's comm (the trained elements, sent as an
all-reduce, which a ring pays twice, when they are under half of that input; else the same reduce-scatter).

The projection is arithmetic, not a measurement: ring all-reduce moves 2(n-1)/n of the buffer per rank over
each link, plus 2(n-1) hops of latency; stated link: 50 GB/s per rank (400 Gb/s InfiniBand NDR), 5 us per hop.

usage: python benchmarks/bench_distributed.py [--rounds 10] [--quick]
"""

import copy
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsecc
from sparsecc.distributed import reduce_scatter
from bench_sparse_update import layer_freeze, transformer_case
from common import cli, interleaved_medians

WORLD, LR = 2, 1e-3
LINK_BYTES_PER_S, HOP_SECONDS = 50e9, 5e-6


class Counter:
    def __init__(self):
        self.bytes_sent = 0


def _counting_allreduce(counter: Counter, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (average of the bucket), counting the bytes it sends."""
    buffer = bucket.buffer()
    counter.bytes_sent += buffer.numel() * buffer.element_size()
    buffer.div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


class TorchStep:
    """forward, backward, torch.optim.AdamW; bytes() are those of the last step."""

    def __init__(self, fn, params, counter):
        self.fn, self.counter, self.opt = fn, counter, torch.optim.AdamW(params, lr=LR)

    def __call__(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = lm_loss(self.fn(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def bytes_per_step(self, x, y) -> int:
        before = self.counter.bytes_sent
        self(x, y)
        return self.counter.bytes_sent - before


class CountingReduceScatter(Counter):
    """FSDP2's plain reduce-scatter (set_custom_reduce_scatter), counting its input bytes."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.bytes_sent += input_tensor.numel() * input_tensor.element_size()
        return reduce_scatter(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def ddp_with_counter(model, **kwargs) -> tuple[DDP, Counter]:
    ddp, counter = DDP(model, **kwargs), Counter()
    ddp.register_comm_hook(counter, _counting_allreduce)
    return ddp, counter


def variants(model, scheme, x, y) -> dict:
    out = {}
    m = copy.deepcopy(model)
    ddp, counter = ddp_with_counter(m)
    out["ddp-full"] = TorchStep(ddp, m.parameters(), counter)
    m = copy.deepcopy(model)
    trained = layer_freeze(m, scheme)
    ddp, counter = ddp_with_counter(m)
    out["ddp-freeze"] = TorchStep(ddp, trained, counter)
    m = copy.deepcopy(model)
    trained = layer_freeze(m, scheme)
    ddp, counter = ddp_with_counter(m)
    out["ddp-freeze-inductor"] = TorchStep(torch.compile(ddp), trained, counter)
    m = copy.deepcopy(model)
    ddp = sparsecc.data_parallel(m, scheme)
    out["sparsecc-backend"] = TorchStep(torch.compile(ddp, backend="sparsecc", options={"update": scheme}),
                                        scheme.trained(m), ddp.sparsecc_comm)
    m = copy.deepcopy(model)
    step = sparsecc.compile_train_step(m, lm_loss, optimizer=sparsecc.AdamW(lr=LR), update=scheme,
                                       example_inputs=(x, y), process_group=dist.group.WORLD)
    step.bytes_per_step = lambda x, y: next(p.counts for p in step.report.passes
                                            if p.name == "all_reduce_gradients")["bytes_all_reduced"]
    out["sparsecc"] = step
    m = copy.deepcopy(model)
    layer_freeze(m, scheme)
    fully_shard(m)
    m.set_custom_reduce_scatter(counter := CountingReduceScatter())
    out["fsdp2-freeze"] = TorchStep(m, [p for p in m.parameters() if p.requires_grad], counter)
    m = copy.deepcopy(model)
    sparsecc.fully_shard(m, scheme)
    out["sparsecc-fsdp2"] = TorchStep(torch.compile(m, backend="sparsecc", options={"update": scheme}),
                                      [p for p in m.parameters() if p.requires_grad], m.sparsecc_comm)
    return out


def rank_main(rank: int, port: int, quick: bool, rounds: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPARSECC_PROGRESS="0")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, model, (ids,), scheme = transformer_case(quick)
    y = torch.randint(0, 512, ids.shape)
    share = ids.shape[0] // WORLD
    x, y = ids[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    steps = variants(model, scheme, x, y)
    times = interleaved_medians({k: (lambda s=s: s(x, y)) for k, s in steps.items()}, rounds)
    sent = {k: s.bytes_per_step(x, y) for k, s in steps.items()}
    if rank == 0:
        results.put((times, sent))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the projection ------------------------------------------------------------------------------------------
class Block(nn.Module):        # the GPT of ../shared/gpu/train_on_gpu.py (parameters only: nothing runs)
    def __init__(self, d):
        super().__init__()
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class GPT(nn.Module):
    def __init__(self, d, layers, vocab, seq):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)


def projected_bytes() -> dict[str, int]:
    """Bytes each data-parallel engine reduces per step for the 6.7 B GPT (bf16) under the README's scheme."""
    with torch.device("meta"):
        model = GPT(4096, 32, 32000, 512)
    last = 31
    scheme = sparsecc.UpdateScheme({f"blocks.{last - 1}.*.bias": "full", f"blocks.{last}.*.bias": "full",
                                    f"blocks.{last}.fc1.weight": sparsecc.Channels(0.25),
                                    f"blocks.{last}.fc2.weight": sparsecc.Channels(0.5, dim="out"), "lnf.*": "full"})
    rules = scheme.resolve(dict(model.named_parameters()))
    full = frozen = trained = 0
    for name, p in model.named_parameters():
        rule, size = rules[name], p.numel() * 2
        full += size
        frozen += size if rule != "frozen" else 0
        if rule == "full":
            trained += size
        elif isinstance(rule, sparsecc.Channels):
            trained += size // p.shape[rule.axis] * rule.count(p.shape[rule.axis])
    return {"DDP, full training": full, "DDP, requires_grad freezing": frozen, "sparsecc (trained elements)": trained}


def ring_seconds(nbytes: int, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * nbytes / LINK_BYTES_PER_S + 2 * (ranks - 1) * HOP_SECONDS


def main():
    args = cli(__doc__, rounds=10)
    print(f"{WORLD} processes (gloo), 1 thread each; bytes per step per rank: all-reduced (DDP, one graph), "
          f"reduce-scatter input or packed all-reduce (FSDP2)", flush=True)
    results = mp.get_context("spawn").SimpleQueue()
    print("[distributed] compiling on both ranks ...", file=sys.stderr, flush=True)
    mp.start_processes(rank_main, args=(free_port(), args.quick, args.rounds, results), nprocs=WORLD,
                       start_method="spawn")
    times, sent = results.get()
    header = f"{'variant':22}{'step ms':>9}{'vs ddp-freeze-ind.':>20}{'bytes/step':>12}{'vs sparsecc':>13}"
    print(header)
    print("-" * len(header))
    for name in times:
        print(f"{name:22}{times[name] * 1e3:9.1f}{times['ddp-freeze-inductor'] / times[name]:19.2f}x"
              f"{sent[name]:12,d}{sent[name] / sent['sparsecc']:12.1f}x")
    print("\nPROJECTED (arithmetic, not measured): communication per step, 6.7 B GPT (bf16, 32 layers, d=4096,")
    print(f"vocab 32000), ring all-reduce at {LINK_BYTES_PER_S / 1e9:.0f} GB/s per rank, {HOP_SECONDS * 1e6:.0f} us per hop")
    sizes = projected_bytes()
    header = f"{'engine':30}{'MB/step':>10}" + "".join(f"{f'{n} ranks ms':>14}" for n in (8, 64, 512))
    print(header)
    print("-" * len(header))
    for name, nbytes in sizes.items():
        print(f"{name:30}{nbytes / 1e6:10.1f}" + "".join(f"{ring_seconds(nbytes, n) * 1e3:14.3f}" for n in (8, 64, 512)))


if __name__ == "__main__":
    main()
