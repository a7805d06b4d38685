"""The `sparsecc` command: look inside an artifact, or train from one without the model's code.

    sparsecc inspect finetune.sparsecc [--json | --graph train_step|forward]
    sparsecc run finetune.sparsecc --data batches.npz --steps 100 [--target aarch64]

batches.npz holds arrays `x` and `y` whose first dimension indexes batches (a model with several
positional inputs takes `x.0`, `x.1`, ... instead of `x`); steps cycle over the batches.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import progress
from .errors import ConfigError, human
from .export import archive
from .export.archive import ArtifactError

# torch, numpy and the rest of sparsecc.export are imported inside the commands that need them, so that
# `sparsecc --help` and `sparsecc inspect` start in well under a second (importing torch and its compiler
# stack takes 5-10 s); tests/test_cli.py checks that neither imports torch.
WEIGHTS = "weights.safetensors"     # = sparsecc.export.artifact.WEIGHTS (tests/test_cli.py checks they agree)
DENSE = "dense"                     # = sparsecc.export.layouts.DENSE
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U8": "u1", "BOOL": "?"}


def _safetensors_table(path, blob: bytes) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file, read without torch: header maps each tensor's name to its dtype,
    shape and byte range in data. ArtifactError when the file is not valid safetensors."""
    def bad(why):
        return ArtifactError(f"{path}: {WEIGHTS} is not a valid safetensors file ({why})")
    if len(blob) < 8:
        raise bad("shorter than its 8-byte header length")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise bad(f"header of {n} bytes in a file of {len(blob)}")
    try:
        header = json.loads(blob[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    for name, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)
        offsets = entry.get("data_offsets") if ok else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= len(data)):
            raise bad(f"entry {name!r} is malformed or points outside the file")
    return header, data


def _scalar(entry: dict, data: bytes) -> float:
    import numpy as np
    start, end = entry["data_offsets"]
    return np.frombuffer(data[start:end], dtype=_DTYPES[entry["dtype"]]).reshape(-1)[0].item()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def inspect(path: str, as_json: bool = False) -> str:
    """A readable summary of an artifact: versions, targets, files, signatures, parameter table."""
    manifest, files = archive.read(path)
    if as_json:
        return json.dumps(manifest, indent=1, sort_keys=True)
    tensors, data = _safetensors_table(path, files[WEIGHTS])
    step = int(_scalar(tensors["step"], data)) if "step" in tensors and tensors["step"]["dtype"] in _DTYPES else 0
    opt = manifest.get("optimizer", {})
    lines = [f"{path}: sparsecc artifact v{manifest['format_version']} (sparsecc {manifest.get('sparsecc_version')}, "
             f"torch {manifest.get('torch_version')})",
             f"targets: {', '.join(manifest.get('targets', []))}; trained for {step} "
             f"steps; optimizer {opt.get('type')}(" + ", ".join(f"{k}={v}" for k, v in opt.items() if k != "type") + ")",
             "", "files:"]
    lines += [f"  {name:<40} {human(e['bytes']):>10}  sha256 {e['sha256'][:16]}…" for name, e in manifest["files"].items()]
    for fn in ("train_step", "train_step@host", "forward"):
        if fn not in manifest["functions"]:       # train_step@host: the host's own step (sparse kernels)
            continue
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
            stored = human(sum(tensors[k]["data_offsets"][1] - tensors[k]["data_offsets"][0] for k in keys))
            update = p["update"] + (f" {p['trained_shape']}" if p["trained_shape"] not in (None, p["shape"]) else "")
        lines.append(f"  {p['name']:<34} {str(p['shape']):<14} {p['dtype']:<8} {p['layout']:<13} {update:<46} {stored:>9}")
    dense = sum(_numel(p["shape"]) * 4 for p in manifest["parameters"] if not p["tied_to"])
    sparse = [p for p in manifest["parameters"] if p["layout"] != DENSE]
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
    from .export.artifact import host_exported, signature
    with progress.waiting(f"reading the {function} program of {path}"):
        exported = host_exported(path, name, files[name], manifest)
    sig = signature(manifest, "host", function)
    placeholders = [n.name for n in exported.graph.find_nodes(op="placeholder")]
    lines = [f"# {function}: inputs"] + [f"#   {p:<16} {s['key']}" for p, s in zip(placeholders, sig["inputs"])]
    lines += [f"# outputs, in order: {', '.join(s['key'] for s in sig['outputs'])}", exported.graph_module.code]
    return "\n".join(lines)


def _batches(path: str) -> tuple[list, list]:
    import numpy as np
    import torch
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
    import platform

    from .export.artifact import check_target, load
    from .export.iree import fetch_iree_run_module
    xs, ys = _batches(data)
    check_target(path, archive.read(path)[0], target)     # the artifact's own targets, before any download
    arch = target.partition(":")[0]                       # "x86_64:x86-64-v3" runs on x86_64
    iree_run_module = None if arch in ("host", platform.machine()) else fetch_iree_run_module(arch)
    with progress.waiting(f"loading {path} for {target}"):
        runner = load(path, target=target, iree_run_module=iree_run_module)
    show = progress.enabled()
    tty, losses = show and sys.stderr.isatty(), []
    for i in range(steps):
        losses.append(float(runner.train_step(xs[i % len(xs)], ys[i % len(ys)])))
        if show and (tty or (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps):
            print(("\r" if tty else "") + _bar(i + 1, steps, losses[-1]), end="" if tty else "\n", file=sys.stderr,
                  flush=True)
    if tty:
        print(file=sys.stderr)
    if save:
        with progress.waiting(f"saving {out or path}"):
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
    p.add_argument("--target", default="host", help="host (PyTorch) or a CPU target the artifact holds, spelled as "
                                                    "saved: x86_64, x86_64:host, aarch64:cortex-a76, ...")
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
    except BrokenPipeError:
        # the reader went away (`sparsecc inspect ... | head`): stop quietly, as other command-line tools do.
        # stdout now points at /dev/null so the interpreter's final flush cannot raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141     # 128 + SIGPIPE, the status a tool killed by the closed pipe would have
    return 0


if __name__ == "__main__":
    sys.exit(main())
