"""Where training memory goes: a liveness model of a graph, and a measurement of a real step.

The model walks the graph in execution order: a node's output is allocated when it runs and freed after
its last use; views, in-place writes (ops whose schema says the result aliases an input) and getitem share
their base's storage; graph inputs are resident and not counted; graph outputs stay live to the end.
"""
from __future__ import annotations

import contextlib
import operator
import os
import re
import sys
import tempfile
from dataclasses import dataclass

import torch.fx as fx
from torch.profiler import ProfilerActivity, profile

from ._torch import memory_timeline
from .graph import nbytes


@dataclass
class Timeline:
    names: list[str]          # node names in execution order
    live_bytes: list[int]     # bytes live while each node runs (its output allocated; graph inputs excluded)

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
    """Each node -> the node that allocated the storage it lives in."""
    root: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        base = node.args[0] if node.op == "call_function" and aliases_input(node) and node.args else None
        root[node] = root.get(base, base) if isinstance(base, fx.Node) else node
    return root


def liveness(gm: fx.GraphModule, order: list[fx.Node] | None = None) -> Timeline:
    """The bytes live after each node when the graph runs in `order` (default: graph order)."""
    order = order or [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    roots = storage_roots(gm)
    position = {n: i for i, n in enumerate(order)}
    end = len(order)
    last_use: dict[fx.Node, int] = {}
    for node in order:
        for arg in node.all_input_nodes:
            r = roots[arg]
            last_use[r] = max(last_use.get(r, -1), position[node])
        last_use.setdefault(roots[node], position[node])
    for out in gm.graph.output_node().all_input_nodes:
        last_use[roots[out]] = end
    frees: dict[int, int] = {}
    live, timeline = 0, []
    for i, node in enumerate(order):
        if roots[node] is node:
            size = nbytes(node.meta.get("val"))
            live += size
            frees[last_use[node]] = frees.get(last_use[node], 0) + size
        timeline.append(live)
        live -= frees.pop(i, 0)
    return Timeline([n.name for n in order], timeline)


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
    with _without_kineto_lines():
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
