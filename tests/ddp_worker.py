"""One rank of DDP training under the sparsecc backend, for tests/test_data_parallel.py (not a test module).

usage: python ddp_worker.py RANK WORLD PORT MODEL SCHEME ORDER FIND_UNUSED(0|1) OUT_DIR
ORDER "compile(dp)" is torch.compile(sparsecc.data_parallel(model, scheme), backend="sparsecc"), "dp(compile)"
is sparsecc.data_parallel(torch.compile(model, backend="sparsecc"), scheme). 3 SGD steps on every parameter of
the model (an optimizer skips a parameter whose .grad is None).
"""
import sys

import torch

import sparsecc
from test_data_parallel import join_as_rank, sgd_steps_and_record
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
    sgd_steps_and_record(model, trained, x, y, loss_fn, out, rank, lambda: ddp.sparsecc_comm.bytes_sent)


if __name__ == "__main__":
    main()
