"""fuse_linear_cross_entropy: the output projection and its cross-entropy loss, chunked over tokens, so the
full logits never exist.

Runs on the captured graph of a training step, before AOTAutograd builds the joint graph. It finds
`linear(h, W, b) -> [slice / view / flatten / upcast ...] -> cross_entropy(logits, target)` (the form
`F.cross_entropy` and `transformers`' own loss code take once captured) and replaces it by the op
`sparsecc::linear_cross_entropy` (sparsecc/ops/linear_cross_entropy.py), which walks the tokens in chunks:
per chunk the logits, the loss contribution, and — a training step always backpropagates from its loss —
the gradients for the hidden states, the weight and the bias, each only when the scheme trains something
it reaches (a frozen head computes no weight gradient; frozen layers below, no hidden-state gradient).

Exact to summation order: the chunks' losses and weight gradients are summed chunk by chunk (float32:
relative differences ~1e-6 against the unfused graph; float64 ~1e-15).
Chunk size: the chunk's logits take at most as many bytes as the hidden states entering the projection
(which are live anyway), but never more than MAX_CHUNKS chunks; the report records it and the logits bytes avoided.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..graph import call
from ..ops import linear_cross_entropy  # noqa: F401  (registers sparsecc::linear_cross_entropy)
from . import PassResult

aten = torch.ops.aten
NAME = "fuse_linear_cross_entropy"

_INFO = (aten._assert_tensor_metadata.default,)        # users that only check metadata
_SAME = {aten.contiguous.default, aten.alias.default, aten.clone.default, aten.detach.default}
_CAST = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_LINEAR = aten.linear.default
_CE = aten.cross_entropy_loss.default
_REDUCTIONS = {1: "mean", 2: "sum"}


def _depends_on_trained(node: fx.Node, is_trained) -> bool:
    """Whether a trained parameter flows into node (then its gradient is needed)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("get_attr", "placeholder") and is_trained(n):
            return True
        todo.extend(n.all_input_nodes)
    return False


def _arg(node: fx.Node, name: str):
    """The argument `name` of an ATen call, positional, keyword or default."""
    schema = node.target._schema
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, a.default_value)
    raise KeyError(name)


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target not in _INFO]


def _transferable(node: fx.Node, vocab: int) -> bool:
    """Does node act on the logits without touching their last (vocabulary) dimension?"""
    if node.target in _SAME or node.target in _CAST:
        return True
    rank = node.args[0].meta["val"].dim()
    if node.target is aten.slice.Tensor:
        return _arg(node, "dim") % rank != rank - 1
    if node.target is aten.flatten.using_ints:
        return _arg(node, "end_dim") % rank != rank - 1
    if node.target in (aten.view.default, aten.reshape.default):
        return node.meta["val"].shape[-1] == vocab and node.args[0].meta["val"].shape[-1] == vocab
    return False


def _match(ce: fx.Node):
    """(linear node, chain of nodes from the linear to the loss input) or the reason there is no match."""
    if _arg(ce, "weight") is not None:
        return "class weights"
    if _arg(ce, "reduction") not in _REDUCTIONS:
        return "reduction='none'"
    logits = ce.args[0]
    if logits.meta["val"].dim() != 2:
        return f"logits of {logits.meta['val'].dim()} dims (class dimension not last)"
    vocab = logits.meta["val"].shape[-1]
    chain, node = [], logits
    while node.op == "call_function" and node.target is not _LINEAR:
        if len(_users(node)) != 1 or not _transferable(node, vocab):
            return f"{node.target} between the projection and the loss"
        chain.append(node)
        node = node.args[0]
    if node.op != "call_function" or len(_users(node)) != 1:
        return "no projection (linear) feeding the loss alone"
    return node, chain[::-1]


MAX_CHUNKS = 8     # each chunk is a call of its own, and each adds its part into the whole weight gradient:
                   # fewer, larger chunks run faster. A 1020-token Llama head (384 x 8192, float32, 2 threads):
                   # 16 chunks 162 ms and 18 MB peak, 8 chunks 141 ms and 22 MB, 4 chunks 132 ms and 31 MB,
                   # unfused 122 ms and 100 MB.


def _chunk_rows(n: int, d: int, vocab: int, logits_itemsize: int, h_itemsize: int) -> int:
    """Rows per chunk: the chunk's logits no larger than the hidden states (live anyway), in at most
    MAX_CHUNKS chunks."""
    return max(-(-n // MAX_CHUNKS), min(n, (n * d * h_itemsize) // (vocab * logits_itemsize)))


def fuse_linear_cross_entropy(gm: fx.GraphModule, is_trained) -> PassResult:
    """Rewrite every fusable projection + cross-entropy of gm; is_trained(node) says whether a get_attr or
    placeholder node is a parameter the step trains (the gradients the fused op computes follow from it)."""
    result = PassResult(NAME)
    graph = gm.graph
    for ce in list(graph.find_nodes(op="call_function", target=_CE)):
        matched = _match(ce)
        if isinstance(matched, str):
            result.notes.append(f"{ce.name}: the loss is computed unfused ({matched})")
            continue
        linear, chain = matched
        h, weight, bias = _arg(linear, "input"), _arg(linear, "weight"), _arg(linear, "bias")
        d = h.meta["val"].shape[-1]
        logits = ce.args[0].meta["val"]
        n, vocab = logits.shape
        chunk = _chunk_rows(n, d, vocab, logits.element_size(), h.meta["val"].element_size())
        if chunk >= n:
            result.notes.append(f"{ce.name}: the loss is computed unfused (its {n}x{vocab} logits take no more "
                                f"bytes than the {n}x{d} hidden states they come from: nothing to save)")
            continue
        cast = None
        with graph.inserting_before(ce):
            x = h
            for node in chain:                 # the same slicing and reshaping, on h instead of the logits
                if node.target in _CAST:
                    cast = node.meta["val"].dtype
                    continue
                args = [x, *node.args[1:]]
                if node.target in (aten.view.default, aten.reshape.default):
                    args[1] = [*args[1][:-1], d]
                x = call(graph, node.target, args, NAME, dict(node.kwargs))
            grads = _depends_on_trained(h, is_trained), _depends_on_trained(weight, is_trained)
            fused = call(graph, torch.ops.sparsecc.linear_cross_entropy.default, (
                x, weight, bias, _arg(ce, "target"), _REDUCTIONS[_arg(ce, "reduction")], _arg(ce, "ignore_index"),
                float(_arg(ce, "label_smoothing")), cast, chunk, *grads), NAME)
            loss = call(graph, operator.getitem, (fused, 0), NAME)
        ce.replace_all_uses_with(loss)
        for node in [ce, *chain[::-1], linear]:
            for user in [u for u in node.users if u.target in _INFO]:
                graph.erase_node(user)
            graph.erase_node(node)
        result.counts["losses_fused"] = result.counts.get("losses_fused", 0) + 1
        result.counts["chunk_rows"] = chunk
        result.counts["logits_bytes_avoided"] = result.counts.get("logits_bytes_avoided", 0) + \
            (n - chunk) * vocab * logits.element_size()
        wanted = " and ".join(w for w, g in zip(("hidden states", "weight"), grads) if g) or "nothing"
        result.notes.append(f"{linear.name} -> {ce.name}: output projection and cross-entropy fused, {n} tokens "
                            f"in chunks of {chunk}: logits of {chunk}x{vocab} at a time instead of {n}x{vocab}; "
                            f"gradients computed for {wanted}")
    gm.recompile()
    return result
