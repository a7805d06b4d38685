"""What every benchmark shares: its command line and interleaved timing."""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def cli(doc: str, rounds: int, sections: tuple[str, ...] = ()) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=rounds)
    if sections:
        ap.add_argument("--only", choices=sections, help="run one section of the benchmark")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run, not a measurement)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.rounds} interleaved steps")
    return args


def interleaved_medians(steps: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, called in turn so drift hits all alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
