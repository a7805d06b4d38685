"""One rank of a data-parallel training run for tests/test_data_parallel.py (not a test module).

usage: python dp_worker.py RANK WORLD PORT MODEL SCHEME OPTIMIZER EXECUTOR BUCKET_MB OUT_DIR
Trains 3 steps of compile_train_step(..., process_group=WORLD) in float64 on this rank's share of the global
batch and writes OUT_DIR/rank<R>.safetensors (parameters) and OUT_DIR/rank<R>.json (losses, report counts).
"""
import json
import os
import sys

import safetensors.torch
import torch
import torch.distributed as dist

import sparsecc
from test_data_parallel import join_as_rank
from test_train_step import OPTIMIZERS, SCHEMES


def main():
    rank, world, port, model_name, scheme, opt, executor, bucket_mb, out = sys.argv[1:]
    model, x, y, loss_fn = join_as_rank(int(rank), int(world), port, model_name)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=OPTIMIZERS[opt][0], update=SCHEMES[model_name][scheme],
                                       example_inputs=(x, y), executor=executor, process_group=dist.group.WORLD,
                                       bucket_cap_mb=float(bucket_mb))
    losses = [float(step(x, y)) for _ in range(3)]
    counts = next(p.counts for p in step.report.passes if p.name == "all_reduce_gradients")
    try:
        sparsecc.save(step, os.path.join(out, "never.sparsecc"))
        refused = ""
    except sparsecc.ConfigError as e:
        refused = str(e)
    safetensors.torch.save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                                os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "counts": counts, "save_refused": refused}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
