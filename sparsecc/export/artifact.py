"""save / load: a compiled training step as a self-contained artifact, and the Runner that trains from one.

    sparsecc.save(step, "finetune.sparsecc", targets=["host", "aarch64"])
    runner = sparsecc.load("finetune.sparsecc")          # no model source needed
    loss = runner.train_step(x, y); logits = runner(x); runner.save()

Contents (see archive.py for the container): manifest.json, weights.safetensors (parameters, buffers, the
optimizer state of trained parts, lr, step, index constants) and per target the `train_step` and `forward`
programs: `host` as torch.export JSON, CPU targets as IREE modules. The runner holds every tensor itself
and feeds the functional programs by key, so the programs stay pure and the same on every target.
"""
from __future__ import annotations

import dataclasses
import operator
import os
import platform
import warnings
from importlib.metadata import version
from pathlib import Path

import safetensors.torch
import torch
from torch.utils._pytree import tree_unflatten, treespec_loads

from .. import progress
from ..calling import flatten
from ..train_step import TrainStep, compile_train_step
from ..config import rule_name
from ..errors import ConfigError, closest
from . import archive, iree, layouts, programs
from .archive import ArtifactError

TARGETS = ("host", *iree.TRIPLES)     # each architecture also as "arch:cpu", a module tuned for one CPU (iree.CPUS)
HOST_TRAIN_STEP = "train_step@host"   # the host's own train_step signature, where it runs sparse kernels
WEIGHTS = "weights.safetensors"
_FUNCTIONS = ("train_step", "forward")


def _program_file(target: str, function: str) -> str:
    """Where a target's function lives: programs/x86_64/train_step.vmfb, and for a tuned module the target with
    '-' for ':' (programs/x86_64-x86-64-v3/...): architectures have no '-', so the name stays unambiguous."""
    return f"programs/{target.replace(':', '-')}/{function}.{'json' if target == 'host' else 'vmfb'}"


def _check_targets(targets) -> list[str]:
    """The targets, deduplicated; ConfigError naming a bad one (before anything is exported or compiled)."""
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
        raise ConfigError(f"targets must be a non-empty list such as ['host', 'aarch64'], got {targets!r}")
    for t in targets:
        arch, cpu = ("host", None) if t == "host" else iree.split(t)
        if cpu == iree.HOST and arch != platform.machine():
            raise ConfigError(f"target {t!r} means the CPU of the machine that saves, but this machine is "
                              f"{platform.machine()}; for {arch} name one of {', '.join(iree.CPUS[arch])}")
    return list(dict.fromkeys(targets))


def check_target(path, manifest: dict, target: str) -> None:
    """Check the artifact's manifest (ArtifactError when malformed), then that it holds target: a ConfigError
    naming its targets and suggesting the closest when not."""
    _check_manifest(path, manifest)
    if target not in manifest["targets"]:
        raise ConfigError(f"{path} holds targets {manifest['targets']}, not {target!r}."
                          f"{closest(str(target), manifest['targets'])} (Re-save with targets=[..., {target!r}] "
                          f"to add it.)")


def signature(manifest: dict, target: str, function: str) -> dict:
    """The manifest's signature of the program a target runs for function ("train_step" or "forward")."""
    own = HOST_TRAIN_STEP if target == "host" and function == "train_step" else None
    return manifest["functions"][own if own in manifest["functions"] else function]


def _parameter_table(step, updates, layout: dict[str, str], first: dict[str, str]) -> list[dict]:
    trained = dict(updates)
    return [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "layout": layout[n],
             "update": rule_name(step.rules[n]), "trained_shape": list(trained[n]) if n in trained else None,
             "tied_to": first[n] if first[n] != n else None}
            for n, p in step.params.items()]


def save(step, path, *, targets=("host",), example_inputs=None, loss_fn=None, optimizer=None, update=None) -> Path:
    """Write `step` to path: its training step and forward for batches shaped like example_inputs (default:
    the step's own example), for each target. Returns the path.

    `step` is a TrainStep, or a model (a torch.compile'd one included, e.g. with backend="sparsecc"): then
    loss_fn, optimizer, example_inputs and the update scheme build its training step with
    compile_train_step first (a compiled model carries no loss or optimizer to save)."""
    targets = _check_targets(targets)
    if isinstance(step, torch.nn.Module):
        if optimizer is None or example_inputs is None:
            raise ConfigError(f"saving a model ({type(step).__name__}) needs optimizer=, example_inputs= and loss_fn= "
                              f"(None for a model that computes its own loss from labels=; and update= for a "
                              f"sparse-update scheme) to build its training step; or pass a TrainStep from "
                              f"sparsecc.compile_train_step")
        # this step is only the source of the exported programs: it never runs here, so Inductor is not worth its
        # time; the cost model picks the host program's sparse kernels (IREE programs read sparse weights densely)
        step = compile_train_step(step, loss_fn, optimizer=optimizer, update=update, example_inputs=example_inputs,
                                  executor="eager", cost_model="measure" if "host" in targets else "dense")
    elif not isinstance(step, TrainStep):
        raise ConfigError(f"sparsecc.save takes a TrainStep from sparsecc.compile_train_step or a model, "
                          f"got {type(step).__name__}")
    if step.comm is not None:
        raise ConfigError("a data-parallel step (compile_train_step(..., process_group=...)) cannot be saved: "
                          "artifacts are single-process; save a step compiled without process_group (same "
                          "model and scheme), e.g. on rank 0")
    x, y = (*(step.example_inputs if example_inputs is None else example_inputs), None)[:2]
    patterns = getattr(step.model, "sparsecc_patterns", {})
    layout = {n: layouts.name(patterns.get(n)) for n in step.params}
    sparse = {n: m.reshape(-1).nonzero().reshape(-1) for n, m in step.masks.items()}
    progress.say("exporting the training step and the forward pass", "sparsecc.save")
    compiled, _ = step._get(x, y)
    # the host runs the sparse kernels where the step does; IREE has no sparsecc:: ops (sparse weights dense there)
    host_train = programs.train_step_program(step, x, y, sparse, sparse_kernels=True) \
        if "host" in targets and compiled.report.stats["sparse_ops"] else None
    train = host_train if targets == ["host"] and host_train is not None else \
        programs.train_step_program(step, x, y, sparse)
    host_train = train if host_train is None else host_train
    forward = programs.forward_program(step, x, sparse)
    stored = {t: (host_train if t == "host" else train, forward) for t in targets}
    files, mlir = {}, {}       # each program is lowered to MLIR once, then compiled for every CPU target
    for target, progs in stored.items():
        for prog in progs:
            if target == "host":
                files[_program_file(target, prog.name)] = programs.dumps(prog)
            else:
                progress.say(f"compiling {prog.name} for {target} (torch-mlir → iree-compile)", "sparsecc.save")
                if prog.name not in mlir:
                    mlir[prog.name] = iree.to_mlir(prog.exported, prog.name)
                files[_program_file(target, prog.name)] = iree.compile_vmfb(mlir[prog.name], target)
    tensors = {k: v for progs in stored.values() for prog in progs for k, v in zip(prog.inputs, prog.example)
               if not k.startswith(("input/", "kernel/"))}    # each program reads only what its graph uses; the
    # sparse kernels' operands are rebuilt from the stored index when loading (layouts.kernel_operands)
    tensors[programs.STEP] = step._step.detach().clone()
    first = programs.first_names(step)
    tensors = {k: v for k, v in tensors.items() if not (k.startswith("param/") and first[k[6:]] != k[6:])}
    tensors.update({f"index/{n}": flat for n, flat in sparse.items()})
    batch, inputs = flatten((x, y))[1], flatten(x)[1]
    manifest = {
        "sparsecc_version": version("sparsecc"), "torch_version": torch.__version__, "targets": targets,
        "cpu_flags": {t: iree.required_flags(t) for t in targets if ":" in t},    # what load() checks
        "functions": {"train_step": {**train.signature(), "batch_spec": batch.dumps(),
                                     "batch_constants": batch.constants_json()},
                      "forward": {**forward.signature(), "input_spec": inputs.dumps(),
                                  "input_constants": inputs.constants_json()},
                      **({HOST_TRAIN_STEP: {**host_train.signature(), "batch_spec": batch.dumps(),
                                            "batch_constants": batch.constants_json()}}
                         if host_train is not train else {})},
        "parameters": _parameter_table(step, compiled.updates, layout, first),
        "optimizer": {"type": type(step.optimizer).__name__, **dataclasses.asdict(step.optimizer)},
    }
    return _write(path, manifest, files, tensors)


def _write(path, manifest: dict, files: dict[str, bytes], tensors: dict[str, torch.Tensor]) -> Path:
    """Write tensors (sparse weights' int64 flat indices stored in their compact layout) with files."""
    shapes = {p["name"]: p["shape"] for p in manifest["parameters"]}
    layout = {p["name"]: p["layout"] for p in manifest["parameters"]}
    stored = {k: layouts.compact(layout[k[6:]], v, shapes[k[6:]]) if k.startswith("index/") else v
              for k, v in tensors.items()}
    files = {WEIGHTS: safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in stored.items()}),
             **files}
    archive.write(path, manifest, files)
    return Path(path)


# ---- loading ----------------------------------------------------------------------------------------

_ALLOWED_NAMESPACES = ("aten", "prims")


def torch_mismatch(manifest: dict) -> str:
    """"" when the artifact's host programs were saved by this torch's major.minor release, else a sentence
    saying which torch made them (torch.export's format is only guaranteed within one release)."""
    saved = str(manifest.get("torch_version", "unknown"))
    if saved.split(".")[:2] == torch.__version__.split(".")[:2]:
        return ""
    return (f"the artifact was saved by torch {saved} and this is torch {torch.__version__}; its host programs "
            f"may not load: load it with torch {saved}, re-save it with this one, or use an IREE target")


def host_exported(path, name: str, data: bytes, manifest: dict) -> torch.export.ExportedProgram:
    """A host program of an artifact, deserialized and checked to call only ATen/prims operators."""
    try:
        exported = programs.loads(data)
    except Exception as e:       # the deserializer's own errors are of many kinds; none runs artifact code
        mismatch = torch_mismatch(manifest)
        raise ArtifactError(f"{path}: {name} is not a valid torch.export program ({type(e).__name__}: {e})"
                            + (f"; {mismatch}" if mismatch else "")) from None
    for node in exported.graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem \
                and node.target not in programs.SPARSE_KERNELS \
                and getattr(node.target, "namespace", None) not in _ALLOWED_NAMESPACES:
            raise ArtifactError(f"{path}: {name} calls {node.target}, which is neither an ATen/prims operator "
                                f"nor one of sparsecc's sparse kernels")
    return exported


def _host_program(path, name: str, data: bytes, executor: str, manifest: dict):
    module = host_exported(path, name, data, manifest).module()
    if executor == "inductor":
        module = torch.compile(module, backend="inductor", fullgraph=True)
    return lambda args: list(module(*args))


class Runner:
    """A loaded artifact. train_step(x, y) trains in place and returns the loss; runner(x) runs the forward
    (eval mode); save() writes the trained state back (atomically)."""

    def __init__(self, path, manifest, files, tensors, target, iree_run_module, executor):
        self.path, self.manifest, self.target = Path(path), manifest, target
        self._files, self.tensors = files, tensors
        self._aliases = {p["name"]: p["tied_to"] for p in manifest["parameters"] if p["tied_to"]}
        self._sig = {f: signature(manifest, target, f) for f in _FUNCTIONS}
        self._run = {f: self._executor(f, target, iree_run_module, executor) for f in _FUNCTIONS}

    def _executor(self, function, target, tool, executor):
        name = _program_file(target, function)
        data = self._files[name]
        if target == "host":
            return _host_program(self.path, name, data, executor, self.manifest)
        n_out = len(self._sig[function]["outputs"])
        if tool is None:
            arch = iree.split(target)[0]
            if arch != platform.machine():
                raise ConfigError(f"target {target!r} is not for this machine ({platform.machine()}); pass "
                                  f"iree_run_module=sparsecc.export.fetch_iree_run_module({arch!r}) to run "
                                  f"it under qemu-{arch}")
            return iree.InProcess(data, function)
        return iree.CommandLine(data, function, n_out, target, tool)

    # ---- feeding --------------------------------------------------------------------------------------
    def _tensor(self, key: str) -> torch.Tensor:
        if key.startswith("param/") and key[6:] in self._aliases:
            key = "param/" + self._aliases[key[6:]]
        return self.tensors[key]

    def _args(self, function: str, leaves: list) -> list[torch.Tensor]:
        sig = self._sig[function]["inputs"]
        leaf = iter(leaves)
        args = [next(leaf) if s["key"].startswith("input/") else self._tensor(s["key"]) for s in sig]
        for s, a in zip(sig, args):
            if not isinstance(a, torch.Tensor):
                raise ConfigError(f"{function} input {s['key']} must be a tensor, got {type(a).__name__}")
            if list(a.shape) != s["shape"] or str(a.dtype).removeprefix("torch.") != s["dtype"]:
                raise ConfigError(f"{function} input {s['key']} is {a.dtype} {list(a.shape)}, the artifact was "
                                  f"compiled for {s['dtype']} {s['shape']}; programs have static shapes")
        return args

    def _leaves(self, function: str, value, spec_key: str) -> list[torch.Tensor]:
        """The tensors of value, checked to have the structure (and constant leaves) the program was saved for."""
        leaves, structure = flatten(value)
        sig = self._sig[function]
        want, constants = sig[spec_key], sig.get(spec_key.replace("_spec", "_constants"), [])
        if structure.dumps() != want:
            raise ConfigError(f"{function} got inputs structured as {structure.spec}, the artifact expects "
                              f"{treespec_loads(want)}")
        if structure.constants_json() != constants:
            raise ConfigError(f"{function} got the non-tensor inputs {structure.constants_json()} ([leaf, value]), "
                              f"the artifact was saved for {constants}")
        return leaves

    @torch.no_grad()
    def train_step(self, x, y=None) -> torch.Tensor:
        args = self._args("train_step", self._leaves("train_step", (x, y), "batch_spec"))  # checked first:
        self.tensors[programs.STEP] += 1                       # a rejected batch must not advance the step
        outs = self._run["train_step"](args)
        loss = None
        for s, value in zip(self._sig["train_step"]["outputs"], outs):
            if s["key"] == programs.LOSS:
                loss = value
            else:
                self.tensors[s["key"]] = value.to(self.tensors[s["key"]].dtype).reshape(s["shape"])
        return loss

    @torch.no_grad()
    def __call__(self, x):
        leaves = self._leaves("forward", x, "input_spec")
        outs = iter(self._run["forward"](self._args("forward", leaves)))
        sig = self._sig["forward"]
        return tree_unflatten([next(outs) if is_tensor else None for is_tensor in sig["out_tensors"]],
                              treespec_loads(sig["out_spec"]))

    def set_lr(self, lr: float) -> None:
        """Change the learning rate (a program input: nothing is recompiled); saved with the artifact."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ConfigError(f"lr must be a number >= 0, got {lr!r}")
        self.tensors[programs.LR].fill_(float(lr))

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter by name as a dense tensor (tied names share one; sparse weights are expanded)."""
        out = {}
        for p in self.manifest["parameters"]:
            name = self._aliases.get(p["name"], p["name"])
            value = self.tensors[f"param/{name}"]
            if p["layout"] != layouts.DENSE:
                value = layouts.densify(value, self.tensors[f"index/{name}"], p["shape"])
            out[p["name"]] = value
        return out

    def save(self, path=None) -> Path:
        """Write the artifact with the current weights, optimizer state and step to path (default: where it
        was loaded from); programs are carried over unchanged."""
        files = {k: v for k, v in self._files.items() if k != WEIGHTS}
        tensors = {k: v for k, v in self.tensors.items() if not k.startswith("kernel/")}   # rebuilt when loading
        manifest = {k: v for k, v in self.manifest.items() if k not in ("files", "format", "format_version")}
        return _write(self.path if path is None else path, manifest, files, tensors)


def load(path, *, target: str = "host", executor: str = "eager",
         iree_run_module: str | os.PathLike | None = None) -> Runner:
    """Load an artifact. target picks the programs: 'host' (torch.export, run by this PyTorch; executor
    'inductor' compiles them with torch.compile on first use, 'eager' runs them op by op) or a CPU target
    the artifact was saved for, spelled as at saving ("x86_64", "x86_64:x86-64-v3", "aarch64:cortex-a76"; run
    by IREE: in process on a machine of that architecture, or with the given `iree-run-module` binary, under
    qemu-user for another architecture). A module tuned for a CPU is refused (ConfigError) on a machine whose
    /proc/cpuinfo lacks a feature it needs (iree.check_cpu), before it could crash with SIGILL."""
    if executor not in ("eager", "inductor"):
        raise ConfigError(f"executor must be 'eager' or 'inductor', got {executor!r}")
    if executor != "eager" and target != "host":
        raise ConfigError(f"executor={executor!r} applies to target='host'; IREE runs the {target} programs")
    manifest, files = archive.read(path)
    check_target(path, manifest, target)
    mismatch = torch_mismatch(manifest) if target == "host" else ""
    if mismatch:
        warnings.warn(f"{path}: {mismatch}", stacklevel=2)
    if target != "host":
        iree.check_cpu(target, manifest.get("cpu_flags", {}).get(target, []))
    if WEIGHTS not in files:
        raise ArtifactError(f"{path}: {WEIGHTS} is missing")
    try:
        tensors = safetensors.torch.load(files[WEIGHTS])
    except Exception as e:        # safetensors reports a bad header as several exception types
        raise ArtifactError(f"{path}: {WEIGHTS} is not a valid safetensors file ({e})") from None
    for p in manifest["parameters"]:
        if p["layout"] != layouts.DENSE:
            key = f"index/{p['name']}"
            try:
                tensors[key] = layouts.expand(p["layout"], tensors[key], p["shape"])
            except (KeyError, ValueError, TypeError) as e:
                raise ArtifactError(f"{path}: {WEIGHTS} holds no valid {p['layout']} index for {p['name']} ({e})") from None
    needed = {s["key"] for s in signature(manifest, target, "train_step")["inputs"] if s["key"].startswith("kernel/")}
    for p in manifest["parameters"]:
        if any(k.startswith(f"kernel/{p['name']}/") for k in needed):
            dtype = getattr(torch, str(p.get("dtype")), None)
            try:
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"dtype {p.get('dtype')!r} is not a torch dtype")
                built = layouts.kernel_operands(p["layout"], tensors[f"index/{p['name']}"], p["shape"], dtype)
            except (ValueError, TypeError, KeyError) as e:
                raise ArtifactError(f"{path}: cannot build the sparse kernels' operands of {p['name']} ({e})") from None
            tensors.update({f"kernel/{p['name']}/{k}": t for k, t in built.items()})
    tied = {f"param/{p['name']}" for p in manifest["parameters"] if p["tied_to"]}
    for fn in _FUNCTIONS:
        if _program_file(target, fn) not in files:
            raise ArtifactError(f"{path}: {_program_file(target, fn)} is missing")
        for s in signature(manifest, target, fn)["inputs"]:
            if not s["key"].startswith("input/") and s["key"] not in tied and s["key"] not in tensors:
                raise ArtifactError(f"{path}: {WEIGHTS} has no tensor {s['key']!r}, which {fn} reads")
    return Runner(path, manifest, files, tensors, target, None if iree_run_module is None else str(iree_run_module),
                  executor)


def _check_manifest(path, manifest: dict) -> None:
    """The fields the runner reads exist and have the right types (the archive checked the rest)."""
    def bad(where):
        return ArtifactError(f"{path}: manifest.json field {where} is missing or malformed")
    if not isinstance(manifest.get("targets"), list) or not isinstance(manifest.get("parameters"), list):
        raise bad("'targets'/'parameters'")
    flags = manifest.get("cpu_flags", {})
    if not (isinstance(flags, dict) and all(isinstance(v, list) and all(isinstance(f, str) for f in v)
                                            for v in flags.values())):
        raise bad("'cpu_flags'")
    for p in manifest["parameters"]:
        if not (isinstance(p, dict) and isinstance(p.get("name"), str) and "tied_to" in p
                and isinstance(p.get("layout"), str) and isinstance(p.get("shape"), list)):
            raise bad(f"parameters[{p!r:.60}]")
    functions = manifest.get("functions", {})
    for fn, spec_key in (("train_step", "batch_spec"), ("forward", "input_spec"),
                         *([(HOST_TRAIN_STEP, "batch_spec")] if HOST_TRAIN_STEP in functions else [])):
        sig = functions.get(fn)
        if not isinstance(sig, dict) or not isinstance(sig.get(spec_key), str):
            raise bad(f"functions.{fn}")
        if fn == "forward" and not (isinstance(sig.get("out_tensors"), list)
                                    and sum(map(bool, sig["out_tensors"])) == len(sig.get("outputs", []))):
            raise bad("functions.forward.out_tensors")
        for side in ("inputs", "outputs"):
            entries = sig.get(side)
            if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("shape"), list)
                    and isinstance(e.get("dtype"), str) for e in entries):
                raise bad(f"functions.{fn}.{side}")
