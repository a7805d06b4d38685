"""The `sparsecc` command: look inside an artifact, or train from one without the model's code.

    sparsecc inspect finetune.sparsecc [--json | --graph train_step|forward]
    sparsecc run finetune.sparsecc --data batches.npz --steps 100 [--target aarch64]

batches.npz holds arrays `x` and `y` whose first dimension indexes batches (a model with several
positional inputs takes `x.0`, `x.1`, ... instead of `x`); steps cycle over the batches.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from .config import ConfigError, human
from .export import ArtifactError, fetch_iree_run_module, load
from .export import archive, layouts
from .export.artifact import WEIGHTS, host_exported


def inspect(path: str, as_json: bool = False) -> str:
    """A readable summary of an artifact: versions, targets, files, signatures, parameter table."""
    manifest, files = archive.read(path)
    if as_json:
        return json.dumps(manifest, indent=1, sort_keys=True)
    try:
        tensors = safetensors.torch.load(files[WEIGHTS])
    except Exception as e:   # noqa: BLE001 (safetensors raises several kinds for a bad header)
        raise ArtifactError(f"{path}: {WEIGHTS} is not a valid safetensors file ({e})") from None
    opt = manifest.get("optimizer", {})
    lines = [f"{path}: sparsecc artifact v{manifest['format_version']} (sparsecc {manifest.get('sparsecc_version')}, "
             f"torch {manifest.get('torch_version')})",
             f"targets: {', '.join(manifest.get('targets', []))}; trained for {int(tensors.get('step', torch.zeros(())))} "
             f"steps; optimizer {opt.get('type')}(" + ", ".join(f"{k}={v}" for k, v in opt.items() if k != "type") + ")",
             "", "files:"]
    lines += [f"  {name:<40} {human(e['bytes']):>10}  sha256 {e['sha256'][:16]}…" for name, e in manifest["files"].items()]
    for fn in ("train_step", "forward"):
        sig = manifest["functions"][fn]
        batch = [f"{s['dtype']}{s['shape']}" for s in sig["inputs"] if s["key"].startswith("input/")]
        lines.append(f"{fn}: batch {', '.join(batch)} -> {len(sig['outputs'])} outputs "
                     f"({len(sig['inputs'])} inputs in all)")
    lines += ["", f"  {'parameter':<34} {'shape':<14} {'dtype':<8} {'layout':<13} {'update':<46} {'stored':>9}"]
    for p in manifest["parameters"]:
        if p["tied_to"]:
            stored, update = f"= {p['tied_to']}", p["update"]
        else:
            keys = [k for k in tensors if k in (f"param/{p['name']}", f"index/{p['name']}")
                    or k.startswith(f"state/{p['name']}/")]
            stored = human(sum(tensors[k].numel() * tensors[k].element_size() for k in keys))
            update = p["update"] + (f" {p['trained_shape']}" if p["trained_shape"] not in (None, p["shape"]) else "")
        lines.append(f"  {p['name']:<34} {str(p['shape']):<14} {p['dtype']:<8} {p['layout']:<13} {update:<46} {stored:>9}")
    dense = sum(torch.Size(p["shape"]).numel() * 4 for p in manifest["parameters"] if not p["tied_to"])
    sparse = [p for p in manifest["parameters"] if p["layout"] != layouts.DENSE]
    lines.append(f"\n{len(sparse)} sparse weights; weights file {human(manifest['files'][WEIGHTS]['bytes'])} "
                 f"(parameters dense in fp32 would be {human(dense)} before optimizer state)")
    return "\n".join(lines)


def graph(path: str, function: str) -> str:
    """The readable code of an artifact's host program (train_step or forward), its inputs and outputs
    named by their keys."""
    manifest, files = archive.read(path)
    name = f"programs/host/{function}.json"
    if function not in ("train_step", "forward"):
        raise ConfigError(f"--graph must be 'train_step' or 'forward', got {function!r}")
    if name not in files:
        raise ConfigError(f"{path} has no host programs (targets {manifest.get('targets')}); the IREE modules are "
                          f"compiled code, not graphs")
    exported = host_exported(path, name, files[name])
    sig = manifest["functions"][function]
    placeholders = [n.name for n in exported.graph.find_nodes(op="placeholder")]
    lines = [f"# {function}: inputs"] + [f"#   {p:<16} {s['key']}" for p, s in zip(placeholders, sig["inputs"])]
    lines += [f"# outputs, in order: {', '.join(s['key'] for s in sig['outputs'])}", exported.graph_module.code]
    return "\n".join(lines)


def _batches(path: str) -> tuple[list, list]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--data {path}: not a readable .npz file ({e})") from None
    keys = set(data.files)
    xs = sorted((k for k in keys if k.startswith("x.")), key=lambda k: int(k[2:]) if k[2:].isdigit() else -1)
    if "y" not in keys or ("x" not in keys and not xs):
        raise ConfigError(f"--data {path} must hold arrays 'x' (or 'x.0', 'x.1', ...) and 'y' with the batch index "
                          f"first; it has {sorted(keys)}")
    columns = [data["x"]] if "x" in keys else [data[k] for k in xs]
    n = {len(c) for c in columns + [data["y"]]}
    if len(n) != 1:
        raise ConfigError(f"--data {path}: arrays disagree on the number of batches ({sorted(n)})")
    x = [torch.from_numpy(np.ascontiguousarray(columns[0][i])) if "x" in keys
         else tuple(torch.from_numpy(np.ascontiguousarray(c[i])) for c in columns) for i in range(n.pop())]
    return x, [torch.from_numpy(np.ascontiguousarray(v)) for v in data["y"]]


def _bar(i: int, steps: int, loss: float) -> str:
    done = int(30 * i / steps)
    return f"step {i:>{len(str(steps))}}/{steps} [{'#' * done}{'.' * (30 - done)}] loss {loss:.4f}"


def run(path: str, data: str, steps: int, target: str = "host", out: str | None = None, save: bool = True) -> list[float]:
    """Train `steps` steps from the batches in data, with a progress bar on stderr; save unless told not to.
    Returns the losses."""
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    xs, ys = _batches(data)
    runner = load(path, target=target, iree_run_module=None if target in ("host", platform.machine()) else
                  fetch_iree_run_module(target))
    tty, losses = sys.stderr.isatty(), []
    for i in range(steps):
        losses.append(float(runner.train_step(xs[i % len(xs)], ys[i % len(ys)])))
        if tty or (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps:
            print(("\r" if tty else "") + _bar(i + 1, steps, losses[-1]), end="" if tty else "\n", file=sys.stderr,
                  flush=True)
    if tty:
        print(file=sys.stderr)
    if save:
        runner.save(out)
    print(f"trained {steps} steps on {target}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
          + (f"; saved {out or path}" if save else ""))
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsecc", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="manifest, targets, files and the parameter table of an artifact")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.add_argument("--graph", choices=("train_step", "forward"), help="print a host program's code")
    p = sub.add_parser("run", help="train from an artifact on batches from an .npz file, then save")
    p.add_argument("artifact")
    p.add_argument("--data", required=True, help=".npz with arrays x (or x.0, x.1, ...) and y, batch index first")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--target", default="host", help="host (PyTorch) or a CPU target the artifact holds")
    p.add_argument("--out", help="save to this path instead of over the artifact")
    p.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(graph(args.artifact, args.graph) if args.graph else inspect(args.artifact, args.json))
        else:
            run(args.artifact, args.data, args.steps, args.target, args.out, not args.no_save)
    except (ArtifactError, ConfigError) as e:
        print(f"sparsecc: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
