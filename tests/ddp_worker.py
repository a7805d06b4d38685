"""One rank of DDP training under the sparsecc backend, for tests/test_data_parallel.py (not a test module).

usage: python ddp_worker.py RANK WORLD PORT MODEL SCHEME ORDER FIND_UNUSED(0|1) OUT_DIR
ORDER "compile(dp)" is torch.compile(sparsecc.data_parallel(model, scheme), backend="sparsecc"), "dp(compile)"
is sparsecc.data_parallel(torch.compile(model, backend="sparsecc"), scheme). 3 SGD steps on every parameter of
the model (an optimizer skips a parameter whose .grad is None).
"""
import json
import os
import sys

import safetensors.torch
import torch
import torch.distributed as dist

import sparsecc
from test_data_parallel import join_as_rank
from test_train_step import SCHEMES


def main():
    rank, world, port, model_name, scheme_name, order, find_unused, out = sys.argv[1:]
    model, x, y, loss_fn = join_as_rank(int(rank), int(world), port, model_name)
    scheme = SCHEMES[model_name][scheme_name]
    options = {"update": scheme, "executor": "eager"}
    if order == "compile(dp)":
        ddp = sparsecc.data_parallel(model, scheme, find_unused_parameters=find_unused == "1")
        trained = torch.compile(ddp, backend="sparsecc", options=options)
    else:
        ddp = trained = sparsecc.data_parallel(torch.compile(model, backend="sparsecc", options=options), scheme,
                                               find_unused_parameters=find_unused == "1")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, with_grad = [], set()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(trained(x), y)
        loss.backward()
        with_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(float(loss))
    safetensors.torch.save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                                os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "bytes_sent": ddp.sparsecc_comm.bytes_sent, "with_grad": sorted(with_grad)}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
