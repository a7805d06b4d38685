"""sparsecc.explain: compile a model once, run one forward and backward, and return what the compiler did.

The model is left as it was: gradients and buffers (BatchNorm running statistics) are restored.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from . import report as report_mod
from ._torch import BackendCompilerFailed
from .backend import backend_for
from .config import Config
from .errors import ConfigError


def _default_loss(output) -> torch.Tensor:
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError("explain: the model returned no floating-point tensor; pass loss_fn=...")
    return sum(t.sum() for t in leaves)


def explain(model: torch.nn.Module, *example_inputs, loss_fn=None, update=None, **options) -> report_mod.Report:
    """Compile model with the sparsecc backend, run one forward and backward on example_inputs,
    and return the Report (merged over graphs if Dynamo split the model)."""
    config = Config.from_options({"update": update, **options})
    config.scheme.resolve(dict(model.named_parameters(remove_duplicate=False)))   # strict, before compiling
    grads = {p: p.grad for p in model.parameters()}
    buffers = {b: b.detach().clone() for b in model.buffers()}
    first = report_mod.registered()
    try:
        compiled = torch.compile(model, backend=backend_for(config))
        try:
            out = compiled(*example_inputs)
        except BackendCompilerFailed as e:   # a scheme the graph cannot honour: show sparsecc's own error
            if isinstance(e.inner_exception, ConfigError):
                raise e.inner_exception from None
            raise
        loss = loss_fn(out) if loss_fn is not None else _default_loss(out)
        loss.backward()
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers.items():
                b.copy_(saved)
    new = report_mod.reports_since(first)
    if not new:
        raise RuntimeError("explain: Dynamo compiled no graph with a backward for this model and input")
    return report_mod.Report.merge(new)
