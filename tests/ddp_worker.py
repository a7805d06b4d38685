"""One rank of torch.compile(DDP(model), backend="sparsecc") with sparsecc.ddp_trained_only, for
tests/test_data_parallel.py (not a test module).

usage: python ddp_worker.py RANK WORLD PORT MODEL SCHEME HOOK(0|1) OUT_DIR
"""
import json
import os
import sys

import safetensors.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsecc
from test_data_parallel import join_as_rank
from test_train_step import SCHEMES


def main():
    rank, world, port, model_name, scheme_name, hook, out = sys.argv[1:]
    model, x, y, loss_fn = join_as_rank(int(rank), int(world), port, model_name)
    scheme = SCHEMES[model_name][scheme_name]
    ddp = DDP(model)
    state = sparsecc.ddp_trained_only(ddp, scheme) if hook == "1" else None
    compiled = torch.compile(ddp, backend="sparsecc", options={"update": scheme, "executor": "eager"})
    opt = torch.optim.SGD(scheme.trained(model), lr=0.05)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    safetensors.torch.save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                                os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "bytes_sent": state.bytes_sent if state else None}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
