"""What a step compiled by Inductor allocates, read from the Python wrapper Inductor generated for it.

Inductor's wrapper is straight-line code whose every allocation is explicit: `bufN = empty_strided_*(...)`
allocates, `bufM = bufN; del bufN # reuse` and `reinterpret_tensor(bufN, ...)` hand a buffer on, `del bufN` frees
it, and an op Inductor does not generate code for (matmuls with `out=` write into a buffer, as do in-place fallbacks
such as `aten.scatter_reduce_.two(buf3, ...)`; attention, convolution or sparsecc's ops without `out=`) allocates
its results when it is called. Walking those statements with the buffers' storage sizes gives the bytes live after
each of them: the step's peak as Inductor planned it, buffer reuse and fusion included. The sizes come from
evaluating each assignment on meta tensors (the allocations' shapes, strides and dtypes; an op's results from its
meta/fake implementation), so nothing runs and nothing is allocated. Graph inputs are resident and not counted, as
in memory.liveness; memory an op holds only while it runs is memory.kernel_workspace's
(sparsecc::linear_cross_entropy's chunks, oneDNN's copies in a CPU convolution).

CUDA wrappers add a device guard block, streams, kernel launches and copy_if_misaligned of inputs, which allocate
nothing, and (Inductor's default there under CUDA graphs) graph partitions: functions `call` hands a list of
arguments, whose returned buffers live on under the caller's names and whose other locals go when they return; each
is walked in its own scope. plan() generates the wrapper for a graph that is not compiled yet (a memory_budget
point). timeline() returns None for a wrapper it cannot follow (a statement it cannot evaluate or size): the caller
keeps its own model then.
"""
from __future__ import annotations

import ast
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


def _function_body(code: str, header: str) -> list[str] | None:
    """The statements of the wrapper's function whose def line is `header` (e.g. "def call(self, args):"), or
    None if it has no single such function."""
    lines = code.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == header]
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
             "empty_strided_cpu_pinned": _empty_strided,
             "extern_kernels": torch._C._VariableFunctions}
_OPS = ("torch.ops.", "aten.", "extern_kernels.")
_EXTERN_OPS = {"mm": torch.ops.aten.mm.default, "addmm": torch.ops.aten.addmm.default,    # extern_kernels.<name>(...,
               "bmm": torch.ops.aten.bmm.default}                                         # out=): what may allocate
# assignments that allocate nothing: streams, devices; copy_if_misaligned (copy_misaligned in other torch versions)
# returns a CUDA input itself unless it is not 16-byte aligned (PyTorch's allocator aligns every tensor it hands out)
_SETUP = ("get_raw_stream", "torch.cuda", "torch.xpu", "copy_if_misaligned", "copy_misaligned")
_MULTI_ASSIGN = re.compile(r"^\(?\w+\s*,[\w\s,]*\)?\s*=[^=]")     # `a, b = ...`, `(a,) = ...`: not followed


def _callee(expr: str, env: dict):
    """What a call expression `name.path(...)` calls."""
    return eval(expr[:expr.index("(")], NAMESPACE, env)   # noqa: S307 (Inductor's own code)


def _writes_in_place(stmt: str, env: dict) -> bool:
    """Whether a statement calls an op that writes into an argument (`aten.scatter_reduce_.two(buf3, ...)`, a
    fallback Inductor calls for its effect): it allocates nothing."""
    try:
        op = _callee(stmt, env)
    except Exception:      # noqa: BLE001 - not an op this can name
        return False
    schema = getattr(op, "_schema", None)
    return bool(schema) and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _op_call(expr: str, env: dict):
    """(op, args, kwargs) of an op Inductor calls as it is (an expression starting with one of _OPS), else None."""
    if not expr.startswith(_OPS) or "(" not in expr:
        return None
    op = _callee(expr, env)
    args, kwargs = eval("(lambda *a, **k: (a, k))" + expr[expr.index("("):], NAMESPACE, env)   # noqa: S307
    return op, args, kwargs


def timeline(code: str, example_inputs, owned=()) -> Timeline | None:
    """The bytes live after each statement of Inductor's wrapper `code` that names or frees a buffer, when it is
    called with example_inputs (real or fake tensors, in the compiled graph's input order); None if the wrapper
    has a statement this cannot follow. Inputs are resident and not counted, except those at the indices in
    owned: the wrapper holds their last reference (a backward's saved activations) and frees them at `del`."""
    body = _function_body(code, "def call(self, args):")
    unpack = body and _UNPACK.match(body[0])
    if not unpack or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        return None
    names = _names(unpack.group(1))
    if len(names) != len(example_inputs):
        return None
    walk = _Walk(code, example_inputs[0].device if example_inputs else None)
    env = {n: _meta(t) for n, t in zip(names, example_inputs)}
    for i in owned:
        walk.buffers.allocate(names[i], env[names[i]])
    with torch.no_grad():
        try:
            done = walk.body(body[1:], env, "")
        except Exception:      # noqa: BLE001 - a wrapper unlike any this was written for must not stop a compile
            return None
    return Timeline(walk.labels, walk.points, "Inductor's buffer plan") if done is not None else None


_UNPACK = re.compile(r"^\(?([\w, ]+?),?\)? = args$")                       # `a, b = args`, `(a,) = args`
_PARTITION_CALL = re.compile(r"^\(?([\w, ]*?),?\)? = self\.partitions\[(\d+)\]\((\w+)\)$")   # `() = ...` too
_LIST = re.compile(r"^(\w+) = \[([\w, ]*)\]$")                               # partitionN_args = [a, b]


def _returned(stmt: str) -> list[str] | None:
    """The names a `return` statement hands back: `return (buf3, )`, `return ()`, a result returned as a view of a
    buffer (`reinterpret_tensor(buf34, (128, ), (1, ), 0)`: buf34), skipping `None` results (a backward's gradients
    of frozen inputs); None for anything else."""
    try:
        value = ast.parse(stmt).body[0].value
    except (SyntaxError, IndexError, AttributeError):
        return None
    items = value.elts if isinstance(value, ast.Tuple) else [value] if value is not None else []
    names = []
    for item in items:
        if isinstance(item, ast.Constant) and item.value is None:
            continue
        if isinstance(item, ast.Call) and getattr(item.func, "id", None) == "reinterpret_tensor" and item.args:
            item = item.args[0]
        if not isinstance(item, ast.Name):
            return None
        names.append(item.id)
    return names


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


class _Walk:
    """Walks the wrapper's statements, its graph partitions' (functions the call hands a list of arguments and
    which return buffers) included: names are scoped per function (a partition's locals go when it returns)."""

    def __init__(self, code: str, device):
        self.code, self.device = code, device
        self.buffers, self.labels, self.points = _Buffers(), [], []
        self.lists: dict[str, list[list[int]]] = {}     # an argument list's key -> each element's storages
        runner = re.search(r"Runner\(partitions=\[([\w, ]*)\]\)", code)
        self.partitions = _names(runner.group(1)) if runner else []

    def body(self, statements: list[str], env: dict, scope: str, args: str | None = None) -> list[str] | None:
        """Walk statements in a function whose names are keyed scope + name (args: the caller's key of the
        argument list, released at args.clear()); returns the names it returns, None where it cannot follow."""
        buffers = self.buffers
        for line in statements:
            for stmt in (s.strip() for s in line.split("#")[0].split(";")):
                if not stmt:
                    continue
                if stmt.startswith("return"):
                    return _returned(stmt)
                if stmt == "args.clear()":
                    if args:
                        buffers.release(args)
                    continue
                if stmt.startswith("del "):
                    for name in _names(stmt[4:]):
                        buffers.release(scope + name)
                        env.pop(name, None)
                    self.labels.append(f"{scope}{stmt}")
                elif _LIST.match(stmt):            # the argument list of a partition: it holds its elements
                    name, items = _LIST.match(stmt).groups()
                    items = _names(items)
                    if any(i not in env for i in items):
                        return None
                    env[name] = [env[i] for i in items]
                    self.lists[scope + name] = [list(buffers.owner.get(scope + i, [])) for i in items]
                    buffers.hold(scope + name, [sid for sids in self.lists[scope + name] for sid in sids])
                    continue
                elif _PARTITION_CALL.match(stmt):
                    outs, index, arg_list = _PARTITION_CALL.match(stmt).groups()
                    if not self.partition(int(index), _names(outs), arg_list, env, scope):
                        return None
                    continue
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
                        workspace = kernel_workspace(op, call[1], call[2], self.device)
                    _assign(buffers, scope, name, expr, value, env, call)
                    env[name] = value
                    if workspace:
                        self.labels.append(f"{scope}{name} (while it runs)")
                        self.points.append(buffers.live + workspace)
                    self.labels.append(scope + name)
                elif (_ASSIGN.match(stmt) and not stmt.split("=", 1)[1].strip().startswith(_SETUP)) or \
                        _MULTI_ASSIGN.match(stmt):
                    return None        # a name this does not know how to size
                elif stmt.startswith(_OPS) and "out=" not in stmt and not _writes_in_place(stmt, env):
                    return None        # an op whose results are not named: not something this follows
                elif stmt.startswith(_OPS) and ("out=" not in stmt or stmt.startswith("extern_kernels.")):
                    try:               # an op writing into its arguments, or a library kernel into a given buffer
                        op, args, kwargs = _op_call(stmt, env)
                    except Exception:
                        return None
                    if stmt.startswith("extern_kernels."):
                        op = _EXTERN_OPS.get(getattr(op, "__name__", ""), op)
                    workspace = kernel_workspace(op, args, {k: v for k, v in kwargs.items() if k != "out"},
                                                 self.device)
                    if workspace:
                        self.labels.append(f"{scope}{stmt[:stmt.index('(')]} (while it runs)")
                        self.points.append(buffers.live + workspace)
                    continue
                else:
                    continue           # a generated kernel, an op writing into buffers it is given, an assert
                self.points.append(buffers.live)
        return None

    def partition(self, index: int, outs: list[str], arg_list: str, env: dict, scope: str) -> bool:
        """`outs = self.partitions[index](arg_list)`: walk the partition's body in its own scope; the caller's names
        outs then hold what it returned, and its other locals are released."""
        if index >= len(self.partitions) or not isinstance(env.get(arg_list), list):
            return False
        body = _function_body(self.code, f"def {self.partitions[index]}(args):")
        if body is None:
            return False
        inner, values = f"{self.partitions[index]}:", env[arg_list]
        local = {}
        unpack = _UNPACK.match(body[0]) if body else None
        if unpack:
            params = _names(unpack.group(1))
            if len(params) != len(values):
                return False
            local = dict(zip(params, values))
            for param, sids in zip(params, self.lists[scope + arg_list]):
                self.buffers.hold(inner + param, sids)
            body = body[1:]
        returned = self.body(body, local, inner, scope + arg_list)
        if returned is None or len(returned) != len(outs):
            return False
        for out, name in zip(outs, returned):
            if name not in local:
                return False
            self.buffers.hold(scope + out, list(self.buffers.owner.get(inner + name, [])))
            env[out] = local[name]
        for name in list(self.buffers.owner):
            if name.startswith(inner):
                self.buffers.release(name)
        return True


def _assign(buffers: _Buffers, scope: str, name: str, expr: str, value, env: dict, call) -> None:
    """Account `name = expr` in a function whose names are keyed scope + name (value: what it evaluated to on meta
    tensors; call: _op_call(expr))."""
    item, alias = _ITEM.match(expr), _ALIAS.match(expr)
    key = scope + name
    if _ALLOC.match(expr):
        buffers.allocate(key, value)
    elif item:                          # one result of a multi-result op: it keeps that result's storage
        parent, index = scope + item.group(1), int(item.group(2))
        buffers.hold(key, [sid for i, sid in buffers.results.get(parent, ()) if i == index])
    elif alias and alias.group(1) in env and call is None:   # another name for a buffer (or input)
        buffers.hold(key, list(buffers.owner.get(scope + alias.group(1), [])))
    else:                               # an op Inductor calls as is: results not aliasing its inputs are new storages
        outs = value if isinstance(value, (tuple, list)) else (value,)
        inputs = {StorageWeakRef(t.untyped_storage()) for t in pytree.tree_leaves(call[1:] if call else ())
                  if isinstance(t, torch.Tensor)}
        buffers.hold(key, [])
        for i, r in enumerate(outs):
            if isinstance(r, torch.Tensor) and StorageWeakRef(r.untyped_storage()) not in inputs:
                buffers.allocate(key, r)
                buffers.results.setdefault(key, []).append((i, buffers.count))


def plan(gm, example_inputs, owned=()) -> Timeline | None:
    """Inductor's buffer plan for gm called on example_inputs: the wrapper Inductor generates for it (its kernels
    not compiled: _torch.inductor_wrapper_code), walked by timeline(); None where it cannot be followed."""
    code = inductor_wrapper_code(gm, example_inputs)
    return timeline(code, example_inputs, owned) if code else None
