"""Searched sparse-update schemes against the hand-written ones under the same memory budgets, on a real task.

A small conv net is pre-trained on scikit-learn's digits 0-4 and fine-tuned on 5-9 (examples/finetune_digits_budget.py).
For each budget: sparsecc.search_scheme's scheme and the best fitting scheme of each hand-written family
(bias-only, last-k layers in full, last-k layers with Channels(0.25 | 0.5) weights), each fine-tuned the same
number of steps with compile_train_step. Memory = optimizer state + the step's peak (weights excluded):
"est." is the liveness model of the compiled step, "meas." one real step under the profiler.

usage: python benchmarks/bench_scheme_search.py [--budgets 700KB 800KB 1MB 1.5MB] [--steps 150] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sparsecc  # noqa: E402
import finetune_digits_budget as digits  # noqa: E402
from sparsecc.config import rule_name  # noqa: E402
from sparsecc.search import baseline_schemes, measure, parse_budget, to_scheme  # noqa: E402

OPTIMIZER = sparsecc.SGD(lr=0.05, momentum=0.9)


def family(name: str) -> str:
    return name if name == "bias-only" else "last-k@" + name.split("@")[1] if "@" in name else "last-k"


def accuracy_after(model, rules, train, test, steps) -> float:
    tuned = copy.deepcopy(model)
    digits.finetune(tuned, to_scheme(rules), train, steps, OPTIMIZER)
    return digits.accuracy(tuned, test)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=["700KB", "800KB", "1MB", "1.5MB"])
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps of every scheme")
    ap.add_argument("--quick", action="store_true", help="few steps and a small search (a smoke run)")
    args = ap.parse_args()
    steps, search_size = (20, dict(population=4, generations=1)) if args.quick else (args.steps, {})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; digits 0-4 -> 5-9, batch {digits.BATCH}, "
          f"{steps} fine-tuning steps, SGD(lr=0.05, momentum=0.9)")
    old, train, test = digits.digits_task()
    model = digits.pretrain(old)
    batches = digits.batches(train, 12, seed=2)
    print(f"pre-trained on 0-4, new classifier: accuracy {digits.accuracy(model, test):.3f} on 5-9", flush=True)
    baselines = {name: (*measure(model, F.cross_entropy, OPTIMIZER, rules, batches[0]),
                        accuracy_after(model, rules, train, test, steps))
                 for name, rules in baseline_schemes(model).items()}
    header = f"{'budget':>8}  {'scheme':14}{'est. MB':>9}{'meas. MB':>9}{'accuracy':>9}{'search s':>9}  trained"
    print(header)
    print("-" * len(header))
    for text in args.budgets:
        budget = parse_budget(text)
        try:
            _, report = sparsecc.search_scheme(model, F.cross_entropy, batches, budget, optimizer=OPTIMIZER,
                                               report=True, **search_size)
        except sparsecc.ConfigError as e:          # below the cheapest scheme: say so and go on
            print(f"{text:>8}  refused: {e}", flush=True)
            continue
        chosen = report.chosen
        rows = {"searched": (chosen.memory_estimate, chosen.memory_measured,
                             accuracy_after(model, chosen.rules, train, test, steps), chosen.describe())}
        best: dict[str, str] = {}
        for name, (estimate, _, acc) in baselines.items():
            if estimate <= budget and (family(name) not in best or acc > baselines[best[family(name)]][2]):
                best[family(name)] = name
        for name in best.values():
            rows[name] = (*baselines[name], ", ".join(f"{n}: {rule_name(r)}"
                                                      for n, r in baseline_schemes(model)[name].items()))
        for name, (estimate, measured, acc, what) in rows.items():
            seconds = f"{report.seconds:9.1f}" if name == "searched" else f"{'':9}"
            print(f"{text:>8}  {name:14}{estimate / 1e6:9.3f}{measured / 1e6:9.3f}{acc:9.3f}{seconds}  {what}")
        top = max((rows[n][2] for n in best.values()), default=None)
        verdict = "no hand-written scheme fits" if top is None else \
            f"searched {rows['searched'][2]:.3f} vs best hand-written {top:.3f}"
        print(f"{'':10}{verdict}", flush=True)


if __name__ == "__main__":
    main()
