"""Autotuning: on a real GPU, the few configurations of the tuning table (configs.candidates) are timed once per
(device, dtype, block size, shape class) and the fastest is kept, in memory and on disk.

The disk cache is $SPARSECC_CACHE_DIR/triton/tuning-<device>-torch<v>-triton<v>.json (one file per GPU model and
library versions, so a driver or compiler upgrade re-tunes). In the interpreter, while planning (tests), with one
candidate, or with SPARSECC_TRITON_TUNE=0, the table's entry (the first candidate) runs untimed. Each candidate is
run once to compile and warm up, then timed over a few launches with CUDA events (ops/tuning.py's gpu_median_ms);
a candidate that fails to compile or launch (e.g. out of shared memory on a smaller GPU than its target's) is
skipped. Tuning a shape takes a few
candidates x a few launches, plus Triton's one-time compilation of each candidate (cached by Triton on disk).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from ...cache import cache_dir
from ...ops import tuning
from ...ops.tuning import device_info, gpu_median_ms
from ...progress import say

_MEMO: dict[tuple[str, str], dict] = {}      # (device key, tuning key) -> the chosen config
BUDGET_MS = 20.0       # timed launches per candidate: as many as fit, 3 to 25


def device_key(device: torch.device) -> str:
    """GPU model, capability and library versions: what a tuning result depends on (the device setup the cost
    model's measurements are filed under too)."""
    return device_info(device).setup


def cache_file(device: torch.device) -> Path:
    return cache_dir() / "triton" / f"tuning-{device_key(device)}.json"


def enabled() -> bool:
    return os.environ.get("SPARSECC_TRITON_TUNE", "1") != "0"


def pick(key: str, variants: list[tuple[object, dict]], run: Callable[[object, dict], object],
         device: torch.device) -> tuple[object, dict]:
    """The (source, config) among variants that runs fastest on the device for the tuning key; measured once
    (run(source, config) launches one variant), then remembered in memory and on disk."""
    if len(variants) == 1 or not enabled():
        return variants[0]
    dkey = device_key(device)
    by_cfg = {json.dumps(cfg, sort_keys=True): (src, cfg) for src, cfg in variants}
    chosen = _MEMO.get((dkey, key))
    if chosen is None:
        path = cache_file(device)
        chosen = tuning.load(path).get(key)
        if chosen is None or json.dumps(chosen, sort_keys=True) not in by_cfg:
            times, failed = {}, {}
            for src, cfg in variants:
                name = json.dumps(cfg, sort_keys=True)
                try:
                    times[name] = gpu_median_ms(lambda: run(src, cfg), device, BUDGET_MS)
                except Exception as e:     # noqa: BLE001 - a candidate that cannot run here is just not chosen
                    failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if not times:
                say(f"tuning {key}: no configuration ran; {failed}")
                return variants[0]
            best = min(times, key=times.get)
            chosen = json.loads(best)
            others = "; ".join([f"{ms:.3f} ms {name}" for name, ms in sorted(times.items(), key=lambda kv: kv[1])
                                if name != best] + [f"failed {name}: {why}" for name, why in failed.items()])
            say(f"tuned {key}: fastest {times[best]:.3f} ms {best}{'; ' + others if others else ''}")
            tuning.store(path, key, chosen)
        _MEMO[(dkey, key)] = chosen
    return by_cfg.get(json.dumps(chosen, sort_keys=True), variants[0])
