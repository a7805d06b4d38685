"""The CUDA buffer plan of bench_llm_memory.py's GPU step, modelled on a machine without a GPU.

usage: python scripts/model_gpu_plan.py {0.74B,6.7B,quick} [--layers N] [--memory-budget SIZE]

compile_train_step captures and transforms the step of the benchmark's bf16 Llama (its GPU configuration, its
sparse-update scheme, head frozen, fused loss) with the parameters on the CPU, uninitialised (the capture runs no
model code); the final graph is then moved to CUDA and Inductor generates its CUDA wrapper with fake CUDA tensors
and an H200's answers to device queries (tests/fake_cuda.py; no kernel is compiled), which
sparsecc.inductor_memory walks: the step peak Inductor would plan on the GPU. A model, not a measurement (the GPU
run of bench_llm_memory.py --only gpu measures), and it differs from Inductor on a GPU where the CPU trace does:
attention is the CPU's fused kernel (which keeps the same output and log-sum-exp as flash attention), and Inductor's
pattern passes and constant folding are off. --layers N keeps the widths and uses N layers (the 6.7 B weights do not
fit this machine's memory as one copy for the capture; the peak of this scheme does not depend on the depth: 294.8
MiB at 0.74 B with 12 layers and with 4). Prints the peak, the statements leading to it, and the scheme's AdamW state.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import bench_llm_memory as bench  # noqa: E402
import fake_cuda  # noqa: E402
import sparsecc  # noqa: E402
from sparsecc import _torch, inductor_memory, memory_budget, train_step  # noqa: E402


class _Captured(Exception):
    pass


def step_graph(size: str, layers: int | None, budget: str | None):
    """(final graph, its inputs, the trained parameters' AdamW state bytes) of the benchmark's GPU step."""
    if layers:
        bench.set_depth(layers)
    model, x, scheme = bench.case(size == "quick", None if size == "quick" else size, "meta", torch.bfloat16,
                                  train_head=False)
    model = model.to_empty(device="cpu")          # traced on the CPU: attention as a fused kernel, as on a GPU
    x = torch.zeros(x.shape, dtype=x.dtype)
    captured = {}

    def stop(gm, example):
        captured.update(gm=gm, example=example)
        raise _Captured
    compile_with_code, train_step.compile_fx_with_code = train_step.compile_fx_with_code, stop
    fit = memory_budget.fit

    def fit_and_say(*args):             # the trade-off points memory_budget= tried (peaks: the CPU's plans)
        result, entry = fit(*args)
        print("memory_budget:", "; ".join(entry.notes), f"(+{entry.counts['extra_flops'] / 1e9:.1f} GFLOP)")
        return result, entry
    memory_budget.fit = fit_and_say
    try:
        step = None
        step = sparsecc.compile_train_step(model, bench.loss_fn, optimizer=sparsecc.AdamW(lr=1e-3), update=scheme,
                                           example_inputs=(x, x), memory_budget=budget)
    except _Captured:
        pass
    finally:
        train_step.compile_fx_with_code, memory_budget.fit = compile_with_code, fit
    assert step is None and captured, "the step was not captured"
    state = sum(2 * math.prod(shape) * 2 for _, shape in captured["gm"].meta["sparsecc_updates"])  # bf16 m, v
    return captured["gm"], captured["example"], state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", choices=["quick", *bench.GPU_CONFIGS])
    parser.add_argument("--layers", type=int)
    parser.add_argument("--memory-budget")
    args = parser.parse_args()
    gm, example, state = step_graph(args.size, args.layers, args.memory_budget)
    fake_cuda.install()
    gm, inputs = fake_cuda.on_cuda(gm, example)
    with train_step.inductor_settings(gm):    # as compile_train_step hands the step to Inductor
        code = _torch.inductor_wrapper_code(gm, inputs)
    plan = inductor_memory.timeline(code, inputs) if code else None
    if plan is None:
        print("no plan: Inductor's wrapper could not be generated or followed")
        return 1
    layers = args.layers or (bench.GPU_CONFIGS[args.size][0] if args.size in bench.GPU_CONFIGS else 2)
    print(f"{args.size} ({layers} layers), bf16, modelled CUDA step peak {plan.peak / 2**20:.1f} MiB "
          f"({plan.model}); AdamW state of the scheme {state / 2**20:.1f} MiB; training memory "
          f"{(plan.peak + state) / 2**20:.1f} MiB")
    at = plan.live_bytes.index(plan.peak)
    print("statements before the peak:", ", ".join(plan.names[max(0, at - 6):at + 1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
