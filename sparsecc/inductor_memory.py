"""What a step compiled by Inductor allocates, read from the Python wrapper Inductor generated for it.

Inductor's wrapper is straight-line code whose every allocation is explicit: `bufN = empty_strided_*(...)`
allocates, `bufM = bufN; del bufN  # reuse` and `reinterpret_tensor(bufN, ...)` hand a buffer on, `del bufN` frees
it, and an op Inductor does not generate code for (matmuls with `out=` write into a buffer; attention, convolution
or sparsecc's ops without `out=`) allocates its results when it is called. Walking those statements with the
buffers' storage sizes gives the bytes live after each of them: the step's peak as Inductor planned it, buffer
reuse and fusion included. The sizes come from evaluating each assignment on meta tensors (the allocations'
shapes, strides and dtypes; an op's results from its meta/fake implementation), so nothing runs and nothing is
allocated. Graph inputs are resident and not counted, as in memory.liveness; memory an op holds only while it
runs is memory.kernel_workspace's (sparsecc::linear_cross_entropy's chunks, oneDNN's copies in a CPU convolution).

CUDA wrappers add a device guard block, streams and kernel launches, which allocate nothing. plan() generates
the wrapper for a graph that is not compiled yet (a memory_budget point). timeline() returns None for a wrapper
it cannot follow (a statement it cannot evaluate; graph partitions, whose calls it does not size): the caller
keeps its own model then.
"""
from __future__ import annotations

import math
import re

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef

from ._torch import inductor_wrapper_code
from .memory import Timeline, kernel_workspace

_ASSIGN = re.compile(r"^(\w+) = (.+)$")
_ALIAS = re.compile(r"^(?:reinterpret_tensor\()?(\w+)\b(?!\[)")       # `bufN` or `reinterpret_tensor(bufN, ...)`
_ITEM = re.compile(r"^(\w+)\[(\d+)\]$")                              # one result of an op that returns several
_ALLOC = re.compile(r"^empty_strided\w*\(")


def _storage_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()


def _call_body(code: str) -> list[str] | None:
    """The statements of the wrapper's call(self, args), or None if it has no single such function."""
    lines = code.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "def call(self, args):"]
    if len(starts) != 1:
        return None
    indent = None
    body = []
    for line in lines[starts[0] + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        if width < indent:
            break
        body.append(line.strip())
    return body


class _Buffers:
    """Which storages each wrapper name keeps alive, and the bytes live."""

    def __init__(self):
        self.owner: dict[str, list[int]] = {}      # a name -> the storages it keeps alive
        self.holders: dict[int, set[str]] = {}     # a storage -> the names keeping it alive
        self.size: dict[int, int] = {}
        self.results: dict[str, list[tuple[int, int]]] = {}   # a multi-result op's name -> (index, storage)
        self.count = 0
        self.live = 0

    def allocate(self, name: str, t: torch.Tensor) -> None:
        self.count += 1
        self.size[self.count], self.holders[self.count] = _storage_bytes(t), {name}
        self.owner.setdefault(name, []).append(self.count)
        self.live += self.size[self.count]

    def hold(self, name: str, sids) -> None:
        self.owner.setdefault(name, [])
        for sid in sids:
            self.holders[sid].add(name)
            self.owner[name].append(sid)

    def release(self, name: str) -> None:
        for sid in self.owner.pop(name, []):
            self.holders[sid].discard(name)
            if not self.holders[sid]:
                self.live -= self.size.pop(sid)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _empty_strided(size, stride, dtype=torch.float32, device=None, **_):
    return torch.empty_strided(size, stride, dtype=dtype, device="meta")


NAMESPACE = {"torch": torch, "aten": torch.ops.aten, "inf": math.inf, "nan": math.nan,
             "device": lambda *a, **k: torch.device("meta"),
             "reinterpret_tensor": lambda t, size, stride, offset=0: t.as_strided(size, stride, t.storage_offset() + offset),
             "empty_strided": _empty_strided, "empty_strided_cpu": _empty_strided, "empty_strided_cuda": _empty_strided,
             "extern_kernels": torch._C._VariableFunctions}
_OPS = ("torch.ops.", "aten.", "extern_kernels.")
# assignments that allocate nothing: streams, devices; copy_misaligned returns a CUDA input itself unless it is
# not 16-byte aligned (PyTorch's allocator aligns every tensor it hands out)
_SETUP = ("get_raw_stream", "torch.cuda", "torch.xpu", "copy_misaligned")
_MULTI_ASSIGN = re.compile(r"^\(?\w+\s*,[\w\s,]*\)?\s*=[^=]")     # `a, b = ...`, `(a,) = ...`: not followed


def _op_call(expr: str, env: dict):
    """(op, args, kwargs) of an op Inductor calls as it is (an expression starting with one of _OPS), else None."""
    if not expr.startswith(_OPS) or "(" not in expr:
        return None
    op = eval(expr[:expr.index("(")], NAMESPACE, env)   # noqa: S307 (Inductor's own code)
    args, kwargs = eval("(lambda *a, **k: (a, k))" + expr[expr.index("("):], NAMESPACE, env)   # noqa: S307
    return op, args, kwargs


def timeline(code: str, example_inputs, owned=()) -> Timeline | None:
    """The bytes live after each statement of Inductor's wrapper `code` that names or frees a buffer, when it is
    called with example_inputs (real or fake tensors, in the compiled graph's input order); None if the wrapper
    has a statement this cannot follow. Inputs are resident and not counted, except those at the indices in
    owned: the wrapper holds their last reference (a backward's saved activations) and frees them at `del`."""
    body = _call_body(code)
    if not body or not re.match(r"^[\w, ]+ = args$", body[0]):
        return None
    names = [n.strip() for n in body[0].split("=")[0].split(",") if n.strip()]
    if len(names) != len(example_inputs) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        return None
    env = {n: _meta(t) for n, t in zip(names, example_inputs)}
    device = example_inputs[0].device if example_inputs else None
    buffers, labels, points = _Buffers(), [], []
    for i in owned:
        buffers.allocate(names[i], env[names[i]])
    with torch.no_grad():
        for line in body[1:]:
            for stmt in (s.strip() for s in line.split("#")[0].split(";")):
                if stmt.startswith("return"):
                    return Timeline(labels, points, "Inductor's buffer plan")
                if stmt.startswith("del "):
                    for name in (n.strip() for n in stmt[4:].split(",")):
                        buffers.release(name)
                        env.pop(name, None)
                    labels.append(stmt)
                elif _ASSIGN.match(stmt) and stmt.startswith("buf"):
                    name, expr = _ASSIGN.match(stmt).groups()
                    try:
                        call = _op_call(expr, env)
                        value = call[0](*call[1], **call[2]) if call else eval(expr, NAMESPACE, env)   # noqa: S307
                    except Exception:
                        return None
                    workspace = 0
                    if call:
                        op = torch.ops.aten.convolution.default if call[0] is torch.convolution else call[0]
                        workspace = kernel_workspace(op, call[1], call[2], device)
                    _assign(buffers, name, expr, value, env, call)
                    env[name] = value
                    if workspace:
                        labels.append(f"{name} (while it runs)")
                        points.append(buffers.live + workspace)
                    labels.append(name)
                elif (_ASSIGN.match(stmt) and not stmt.split("=", 1)[1].strip().startswith(_SETUP)) or \
                        _MULTI_ASSIGN.match(stmt):
                    return None        # a name this does not know how to size (graph partitions' calls too)
                elif stmt.startswith(_OPS) and "out=" not in stmt:
                    return None        # an op whose results are not named: not something this follows
                else:
                    continue           # a generated kernel, an op writing into buffers it is given, an assert
                points.append(buffers.live)
    return None


def _assign(buffers: _Buffers, name: str, expr: str, value, env: dict, call) -> None:
    """Account `name = expr` (value: what it evaluated to on meta tensors; call: _op_call(expr))."""
    item, alias = _ITEM.match(expr), _ALIAS.match(expr)
    if _ALLOC.match(expr):
        buffers.allocate(name, value)
    elif item:                          # one result of a multi-result op: it keeps that result's storage
        parent, index = item.group(1), int(item.group(2))
        buffers.hold(name, [sid for i, sid in buffers.results.get(parent, ()) if i == index])
    elif alias and alias.group(1) in env and call is None:   # another name for a buffer (or input)
        buffers.hold(name, list(buffers.owner.get(alias.group(1), [])))
    else:                               # an op Inductor calls as is: results not aliasing its inputs are new storages
        outs = value if isinstance(value, (tuple, list)) else (value,)
        inputs = {StorageWeakRef(t.untyped_storage()) for t in pytree.tree_leaves(call[1:] if call else ())
                  if isinstance(t, torch.Tensor)}
        buffers.hold(name, [])
        for i, r in enumerate(outs):
            if isinstance(r, torch.Tensor) and StorageWeakRef(r.untyped_storage()) not in inputs:
                buffers.allocate(name, r)
                buffers.results.setdefault(name, []).append((i, buffers.count))


def plan(gm, example_inputs, owned=()) -> Timeline | None:
    """Inductor's buffer plan for gm called on example_inputs: the wrapper Inductor generates for it (its kernels
    not compiled: _torch.inductor_wrapper_code), walked by timeline(); None where it cannot be followed."""
    code = inductor_wrapper_code(gm, example_inputs)
    return timeline(code, example_inputs, owned) if code else None
