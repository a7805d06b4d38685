"""Artifacts: size against a dense torch.save of the same model, save and load time, and the step time of a
loaded runner against the compile_train_step it came from, side by side in one run.

Model: a GPT (d=256, 4 layers, vocab 512, 8 x 64 tokens) whose MLP weights are 25% blocks of 32 and whose
q/k/v weights are 2:4; the update scheme trains biases, norms, the MLP up-projections (sparse) and a quarter
of the attention output channels, with AdamW.
Runners: the host program (torch.export, run op by op or through Inductor) and the x86_64 IREE modules
(iree.runtime, with as many worker threads as torch has): for a generic x86-64 CPU (no AVX), for x86-64-v3
(AVX2, FMA) and for this machine's CPU (target "x86_64:host").

usage: [OMP_NUM_THREADS=1] python benchmarks/bench_artifact.py [--rounds 10] [--quick]
"""
from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import iree.runtime
import torch
import torch.nn.functional as F

import sparsecc
from common import cli, interleaved_medians

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import Transformer  # noqa: E402

SCHEME = sparsecc.UpdateScheme({"blocks.*.k.bias": "frozen", "*.bias": "full", "*ln*": "full",
                                "blocks.*.mlp.fc1.weight": "full",
                                "blocks.*.attn.proj.weight": sparsecc.Channels(0.25)})


X86 = {"x86_64": "generic x86-64 CPU", "x86_64:x86-64-v3": "AVX2 + FMA", "x86_64:host": "this machine's CPU"}


def loss_fn(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def kb(n: int) -> str:
    return f"{n / 1e3:,.0f} KB"


def main():
    args = cli(__doc__, rounds=10)
    iree.runtime.flags.parse_flags(f"--task_topology_max_group_count={torch.get_num_threads()}")   # like torch
    d, layers, vocab, seq, batch = (64, 2, 64, 16, 4) if args.quick else (256, 4, 512, 64, 8)
    model = Transformer(vocab=vocab, d=d, heads=4, layers=layers, seq=seq)
    sparsecc.sparsify(model, sparsecc.Sparsity({"blocks.*.mlp.fc*.weight": sparsecc.Blocks(32 if d >= 128 else 8, 0.25),
                                                "blocks.*.attn.[qkv].weight": sparsecc.NM(2, 4)}))
    x, y = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(1e-3), update=SCHEME,
                                       example_inputs=(x, y))
    step(x, y)

    tmp = Path(tempfile.mkdtemp(prefix="bench-artifact-"))
    t0 = time.perf_counter()
    host_path = sparsecc.save(step, tmp / "host.sparsecc")
    t_save_host = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_path = sparsecc.save(step, tmp / "all.sparsecc", targets=["host", *X86, "aarch64"])
    t_save_all = time.perf_counter() - t0

    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    trained = [p for n, p in model.named_parameters() if step.rules[n] != "frozen"]
    opt = torch.optim.AdamW(trained, lr=1e-3)
    loss_fn(model(x), y).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    dense_opt = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, dense_opt)
    manifest, _ = sparsecc.export.archive.read(host_path)

    print("\nsize")
    print(f"  {'what':<68} {'bytes':>12} {'vs torch.save':>14}")
    rows = [("torch.save(model.state_dict())  (dense)", len(dense.getvalue())),
            ("torch.save(model + torch.optim.AdamW state of the trained params)", len(dense_opt.getvalue())),
            ("sparsecc weights.safetensors (compressed weights + optimizer state)",
             manifest["files"]["weights.safetensors"]["bytes"]),
            ("sparsecc artifact, host programs", host_path.stat().st_size),
            ("sparsecc artifact, host + x86_64 (3 CPUs) + aarch64 programs", all_path.stat().st_size)]
    for name, n in rows:
        print(f"  {name:<68} {kb(n):>12} {n / rows[0][1]:>13.2f}x")

    def timed(fn, n=5):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[n // 2]
    t_load = timed(lambda: sparsecc.load(host_path))
    t_load_x86 = timed(lambda: sparsecc.load(all_path, target="x86_64:host"))
    t_torch_load = timed(lambda: torch.load(io.BytesIO(dense.getvalue()), weights_only=True))
    print("\nsave / load (median of 5 loads)")
    print(f"  save, host programs: {t_save_host:.2f} s; with 3 x86_64 + aarch64 (torch-mlir + iree-compile): "
          f"{t_save_all:.2f} s")
    print(f"  sparsecc.load host: {t_load * 1e3:.0f} ms; x86_64:host: {t_load_x86 * 1e3:.0f} ms; "
          f"torch.load of the dense state_dict: {t_torch_load * 1e3:.0f} ms")

    host = sparsecc.load(host_path)
    x86 = {t: sparsecc.load(all_path, target=t) for t in X86}
    host_inductor = sparsecc.load(host_path, executor="inductor")
    t0 = time.perf_counter()
    host_inductor.train_step(x, y)
    print(f"  first step of the host runner with executor='inductor' (compiles): {time.perf_counter() - t0:.1f} s")
    med = interleaved_medians({"compile_train_step (Inductor)": lambda: step(x, y),
                               "loaded runner, host, eager (torch.export program)": lambda: host.train_step(x, y),
                               "loaded runner, host, executor='inductor'": lambda: host_inductor.train_step(x, y),
                               **{f"loaded runner, {t} (IREE, {what})": lambda r=x86[t]: r.train_step(x, y)
                                  for t, what in X86.items()}},
                              args.rounds)
    base = med["compile_train_step (Inductor)"]
    print(f"\nstep time (medians of {args.rounds} interleaved steps)")
    print(f"  {'variant':<62} {'ms':>9} {'vs compile_train_step':>22}")
    for name, t in med.items():
        print(f"  {name:<62} {t * 1e3:>9.1f} {t / base:>21.2f}x")


if __name__ == "__main__":
    main()
