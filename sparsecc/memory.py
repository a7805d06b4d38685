"""Where training memory goes: a liveness model of a graph, and a measurement of a real step.

The model walks the graph in execution order: a node's output is allocated when it runs and freed after
its last use; views, in-place writes (ops whose schema says the result aliases an input) and getitem share
their base's storage; graph inputs are resident and not counted; graph outputs stay live to the end.
An op's kernel may hold more while it runs (kernel_workspace: sparsecc::linear_cross_entropy's chunks by
formula, oneDNN's reordered copies in a CPU convolution and packed operands in a bfloat16 CPU matmul, and the CPU
SwiGLU backward's float32 chunks where it cannot run its C++ kernel, measured once per shape, the dense gradient of
a weight gradient that runs as a GEMM + gather on a GPU). This is the eager executor's model (within 0.1-3 % of the
measurement on the test and benchmark models). For Inductor, compiled steps are counted from the wrapper Inductor
generates (inductor_memory.py); fused=True is the fallback where that wrapper cannot be followed, and models two
of Inductor's habits: a pointwise value read only by pointwise ops is computed inside their kernels and never
stored, and a pointwise kernel writes its result into an input of the same size that dies there.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.profiler import ProfilerActivity, profile

from ._torch import memory_timeline
from .ops import linear_cross_entropy, swiglu, tuning
from .graph import nbytes


@dataclass
class Timeline:
    names: list[str]          # node names in execution order
    live_bytes: list[int]     # bytes live while each node runs (its output allocated; graph inputs excluded)
    model: str = "liveness model"     # what made it: this module's model, or Inductor's buffer plan

    @property
    def peak(self) -> int:
        return max(self.live_bytes, default=0)


def aliases_input(node: fx.Node) -> bool:
    """Whether node's result shares its first input's storage (a view, getitem, or an in-place write)."""
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None)


def writes_input(node: fx.Node) -> bool:
    """Whether node mutates its first input in place (copy_, index_put_)."""
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.arguments and schema.arguments[0].alias_info is not None
                and schema.arguments[0].alias_info.is_write)


def storage_roots(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Each node -> the node that allocated the storage it lives in. Each result of an op that returns several
    new tensors is a storage of its own, rooted at the (first) getitem taking it: it is freed when that result
    dies, not when the last of its siblings does."""
    root: dict[fx.Node, fx.Node] = {}
    results: dict[tuple, fx.Node] = {}
    for node in gm.graph.nodes:
        base = node.args[0] if node.op == "call_function" and aliases_input(node) and node.args else None
        if node.target is operator.getitem and _fresh_results(base, root):
            root[node] = results.setdefault((base, node.args[1]), node)
        else:
            root[node] = root.get(base, base) if isinstance(base, fx.Node) else node
    return root


def _fresh_results(node, root) -> bool:
    """Whether node is an op that returns several tensors in storages of their own."""
    return isinstance(node, fx.Node) and root.get(node) is node and isinstance(node.meta.get("val"), (tuple, list))


def _taken_results(node: fx.Node, roots) -> list[fx.Node]:
    """The getitems that own results of node (an op with several), one per result."""
    return [u for u in node.users if u.target is operator.getitem and roots[u] is u]


def _pointwise(node: fx.Node) -> bool:
    return node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())


def fused_away(gm: fx.GraphModule) -> set[fx.Node]:
    """The values a fusing executor (Inductor) never stores: a pointwise op whose every user (at most
    MAX_FUSED_USERS of them) is a pointwise op is computed inside its users' kernels. Its inputs are then
    read where the users run."""
    outputs = set(gm.graph.output_node().all_input_nodes)
    return {n for n in gm.graph.nodes if _pointwise(n) and n not in outputs and 0 < len(n.users) <= MAX_FUSED_USERS
            and all(_pointwise(u) for u in n.users)}


MAX_FUSED_USERS = 3     # Inductor stores a pointwise value read by more kernels than a few (realize_reads_threshold)


def _reads(node: fx.Node, fused: set[fx.Node], memo: dict) -> set[fx.Node]:
    """The stored values node reads: its inputs, looking through the fused-away ones to what they read."""
    if node not in memo:
        memo[node] = set()
        for arg in node.all_input_nodes:
            memo[node] |= _reads(arg, fused, memo) if arg in fused else {arg}
    return memo[node]


def liveness(gm: fx.GraphModule, order: list[fx.Node] | None = None, *, fused: bool = False) -> Timeline:
    """The bytes live after each node when the graph runs in `order` (default: graph order). fused=True models
    a fusing executor (Inductor): the values of fused_away(gm) take no memory."""
    order = order or [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    roots = storage_roots(gm)
    away = fused_away(gm) if fused else set()
    memo: dict = {}
    position = {n: i for i, n in enumerate(order)}
    end = len(order)
    last_use: dict[fx.Node, int] = {}
    for node in order:
        for arg in _reads(node, away, memo):
            r = roots[arg]
            last_use[r] = max(last_use.get(r, -1), position[node])
        last_use.setdefault(roots[node], position[node])
    for out in gm.graph.output_node().all_input_nodes:
        last_use[roots[out]] = end
    frees: dict[int, int] = {}
    taken: set[fx.Node] = set()         # stored values whose memory a later kernel has taken over already
    live, timeline = 0, []
    for i, node in enumerate(order):
        if roots[node] is node and node not in away:
            size = nbytes(node.meta.get("val"))
            if node.target is operator.getitem:     # a result its op allocated: it is freed when it dies
                frees[last_use[node]] = frees.get(last_use[node], 0) + size
                timeline.append(live)
                live -= frees.pop(i, 0)
                continue
            donor = _donor(node, size, i, _reads(node, away, memo), roots, last_use, taken) if fused else None
            if donor is None:
                live += size
            else:                       # the kernel writes into an input that dies here: no new memory
                taken.add(donor)
                frees[i] -= size
            kept = sum(nbytes(u.meta.get("val")) for u in _taken_results(node, roots))
            frees[last_use[node]] = frees.get(last_use[node], 0) + size - kept
        timeline.append(live + _workspace(node))
        live -= frees.pop(i, 0)
    return Timeline([n.name for n in order], timeline)


def _workspace(node: fx.Node) -> int:
    if node.target not in _WORKSPACE_OPS:       # the common case, on every liveness walk: nothing to look at
        return 0
    values = lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a   # noqa: E731
    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), values)
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    return kernel_workspace(node.target, args, kwargs, device)


def kernel_workspace(target, args, kwargs, device) -> int:
    """Memory an op's kernel holds only while it runs, beyond its outputs: sparsecc::linear_cross_entropy's chunk
    buffers (its formula; measured once per shape for float16/bfloat16 on the CPU, where oneDNN's reduced-precision
    matmul copies an operand); for a CPU convolution and its backward, oneDNN's reordered copies of inputs, weights
    and outputs, and for a bfloat16 CPU matmul (mm, addmm, bmm) oneDNN's packed operands (measured once per shape
    and strides: that depends on oneDNN's choice of layout; float32 and float16 matmuls allocate nothing); a sparse
    weight gradient that runs as the dense GEMM + gather on this GPU (as measured there: ops/tuning.sddmm_choice),
    the dense [out, in] gradient; else 0."""
    if target not in _WORKSPACE_OPS:        # every other op the Inductor-plan walker meets
        return 0
    if target in _SDDMM_OPS:
        g, x = args[:2]
        key = tuning.sddmm_key(_SDDMM_OPS[target], *args)
        gemm = device is not None and tuning.fastest_known(device, key) == "gemm"
        rows = args[3].shape[0] * 8 if target is torch.ops.sparsecc.csr_sddmm.default else 0   # each nonzero's row
        return g.shape[1] * x.shape[1] * x.element_size() + rows if gemm else 0
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if target in _MATMULS and not any(t.dtype == torch.bfloat16 for t in tensors):
        return 0
    measurable = device is not None and device.type == "cpu" and \
        all(isinstance(d, int) for t in tensors for d in (*t.shape, *t.stride()))      # not symbolic
    if target is torch.ops.sparsecc.linear_cross_entropy.default:
        h, weight, _, _, _, _, _, cast, chunk, input_grad = args[:10]
        if not (measurable and h.dtype in (torch.float16, torch.bfloat16)):
            return linear_cross_entropy.workspace_bytes(h, weight, cast, chunk, input_grad)
    elif not measurable:
        return 0
    spec = tuple((_TENSOR, tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else
                 tuple(a) if isinstance(a, list) else a for a in args)
    return _measured_workspace(target, spec, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                          for k, v in kwargs.items())),
                               tuple(os.environ.get(v) for v in ("SPARSECC_NATIVE", "SPARSECC_TRITON")))


_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
_MEASURED = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default, *swiglu.IN_PLACE_OPS,
             *_MATMULS)
_TENSOR = "tensor"      # marks a tensor's (shape, stride, dtype) in a measured op's cache key
_SDDMM_OPS = {torch.ops.sparsecc.block_sddmm.default: "block_sddmm", torch.ops.sparsecc.nm_sddmm.default: "nm_sddmm",
              torch.ops.sparsecc.csr_sddmm.default: "csr_sddmm"}
_WORKSPACE_OPS = (torch.ops.sparsecc.linear_cross_entropy.default, *_MEASURED, *_SDDMM_OPS)


@functools.lru_cache(maxsize=1024)
def _measured_workspace(target, spec: tuple, kwargs: tuple, implementation: tuple) -> int:
    """The measurement, once per op, operands, and the switches choosing its implementation (sparsecc's own ops)."""
    args = [(torch.empty_strided(a[1], a[2], dtype=a[3]).zero_() if a[:1] == (_TENSOR,) else list(a))
            if isinstance(a, tuple) else a for a in spec]
    outputs = []
    peak = measure_peak(lambda: outputs.append(target(*args, **dict(kwargs))))
    results = outputs[0] if isinstance(outputs[0], (tuple, list)) else outputs[0:1]
    return max(0, peak - sum(nbytes(r) for r in results if isinstance(r, torch.Tensor)))


def _donor(node: fx.Node, size: int, i: int, reads: set[fx.Node], roots, last_use, taken: set) -> fx.Node | None:
    """A stored value a fusing executor's kernel for node writes its result into (Inductor's in-place buffer
    reuse): one it reads whose last use is this node, of the same size, computed in the graph (inputs are not
    the graph's to overwrite); None when there is none or node is not a generated (pointwise) kernel."""
    if not _pointwise(node):
        return None
    for arg in reads:
        r = roots[arg]
        if r.op != "placeholder" and r not in taken and last_use.get(r) == i and nbytes(r.meta.get("val")) == size:
            return r
    return None


_KINETO_LINE = re.compile(rb"^(USDT|STAGE|INFO|WARNING):\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def _without_kineto_lines():
    """Drop the lines libkineto (PyTorch's profiler backend) writes to fd 2 when a profile starts and stops
    ("USDT:... profiler_start", "... profiler_stop"). They come from C++ at a log level read once when torch
    loads (KINETO_LOG_LEVEL), so they cannot be turned off from here; everything else written meanwhile is
    passed through unchanged."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):   # no real fd 2 (embedded interpreters): leave it alone
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(line for line in tmp.read().splitlines(keepends=True) if not _KINETO_LINE.match(line))
            if kept:
                os.write(2, kept)


def measure_peak(fn) -> int:
    """Peak bytes allocated above what was live when fn started, measured by the profiler's memory timeline
    (every CPU allocation and free during fn, those inside compiled kernels included)."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
    with _without_kineto_lines(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning: Profiler clears events")   # torch 2.11: at every first profile
        prof.start()
    try:
        fn()
    finally:
        with _without_kineto_lines():
            prof.stop()
    live = peak = 0
    for _, action, _, size in memory_timeline(prof):
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak
