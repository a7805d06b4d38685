"""reorder_for_memory: reschedule the training graph to lower its peak live bytes.

Greedy list scheduling over the dependency DAG (networkx): among the nodes whose inputs are ready, run
the one that frees the most bytes net of what it allocates (Tiny Training's observation: a weight
gradient that lets an activation die should run before the input gradient that allocates more), keeping
the original order on ties. Random ops keep their relative order, and an in-place update (fuse_optimizer's
write-back) stays after every read of the tensor that precedes it and before every read that follows it, so
results do not change. The new order is kept only if the liveness model says its peak is lower; the recorded
peak_bytes_after is the liveness peak of the order the graph is left in.
"""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from ..graph import nbytes
from ..memory import liveness, storage_roots, writes_input
from . import PassResult, Plan


def _dependency_dag(gm: fx.GraphModule, nodes: list[fx.Node]) -> nx.DiGraph:
    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    members = set(nodes)
    dag.add_edges_from((a, n) for n in nodes for a in n.all_input_nodes if a in members)
    random = [n for n in nodes if torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]
    dag.add_edges_from(zip(random, random[1:]))
    roots = storage_roots(gm)
    position = {n: i for i, n in enumerate(nodes)}
    for write in filter(writes_input, nodes):      # a read keeps its side of the write: before it, the old
        root = roots[write.args[0]]                 # value; after it, the new one (every edge follows the
        for n in nodes:                             # graph order, so the DAG is acyclic)
            if n is not write and any(roots[a] is root for a in n.all_input_nodes):
                dag.add_edge(*((n, write) if position[n] < position[write] else (write, n)))
    return dag


def schedule(gm: fx.GraphModule) -> list[fx.Node]:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    dag = _dependency_dag(gm, nodes)
    roots = storage_roots(gm)
    position = {n: i for i, n in enumerate(nodes)}
    held = {roots[o] for o in gm.graph.output_node().all_input_nodes} | \
           {n for n in gm.graph.nodes if n.op == "placeholder"}
    pending: dict[fx.Node, int] = {}                 # root -> users not yet scheduled
    for n in nodes:
        for r in {roots[a] for a in n.all_input_nodes}:
            pending[r] = pending.get(r, 0) + 1
    size = {n: nbytes(n.meta.get("val")) if roots[n] is n else 0 for n in nodes}

    def score(n):
        freed = sum(size.get(r, 0) for r in {roots[a] for a in n.all_input_nodes}
                    if r not in held and pending[r] == 1)
        return size[n] - freed

    waiting = {n: dag.in_degree(n) for n in nodes}
    ready = [n for n in nodes if waiting[n] == 0]
    order = []
    while ready:
        best = min(ready, key=lambda n: (score(n), position[n]))
        ready.remove(best)
        order.append(best)
        for r in {roots[a] for a in best.all_input_nodes}:
            pending[r] -= 1
        for succ in dag.successors(best):
            waiting[succ] -= 1
            if waiting[succ] == 0:
                ready.append(succ)
    if len(order) != len(nodes):       # an explicit check: an assert would vanish under python -O
        scheduled = set(order)
        stuck = [n.name for n in nodes if n not in scheduled]
        raise RuntimeError(f"reorder_for_memory: the dependency graph has a cycle; {len(stuck)} nodes could not be "
                           f"scheduled (first: {', '.join(stuck[:5])})")
    return order


def reorder_for_memory(gm: fx.GraphModule, plan: Plan) -> PassResult:
    result = PassResult("reorder_for_memory")
    before = liveness(gm).peak
    order = schedule(gm)
    after = liveness(gm, order).peak
    if after < before:
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        for node in order:
            anchor.append(node)
            anchor = node
        gm.recompile()
        result.notes.append(f"peak live bytes {before:,} -> {after:,}")
    else:
        result.notes.append(f"kept the original order (peak {before:,}; the schedule found {after:,})")
    # the peak of the order the graph is left in, measured again (not assumed from the decision above)
    result.counts.update(peak_bytes_before=before, peak_bytes_after=liveness(gm).peak)
    return result
