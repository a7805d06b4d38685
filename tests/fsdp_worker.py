"""One rank of FSDP2 training under the sparsecc backend, for tests/test_data_parallel.py (not a test module).

usage: python fsdp_worker.py RANK WORLD PORT MODEL SCHEME ORDER OUT_DIR
ORDER "compile(shard)" is torch.compile(sparsecc.fully_shard(model, scheme), backend="sparsecc"), "shard(compile)"
is sparsecc.fully_shard(torch.compile(model, backend="sparsecc"), scheme). 3 SGD steps on every parameter.
"""
import sys

import torch

import sparsecc
from test_data_parallel import join_as_rank, sgd_steps_and_record
from test_train_step import SCHEMES


def main():
    rank, world, port, model_name, scheme_name, order, out = sys.argv[1:]
    model, x, y, loss_fn = join_as_rank(int(rank), int(world), port, model_name)
    scheme = SCHEMES[model_name][scheme_name]
    options = {"update": scheme, "executor": "eager"}
    if order == "compile(shard)":
        sharded = sparsecc.fully_shard(model, scheme)
        trained = torch.compile(sharded, backend="sparsecc", options=options)
    else:
        sharded = trained = sparsecc.fully_shard(torch.compile(model, backend="sparsecc", options=options), scheme)
    sgd_steps_and_record(model, trained, x, y, loss_fn, out, rank, lambda: sharded.sparsecc_comm.bytes_sent)


if __name__ == "__main__":
    main()
