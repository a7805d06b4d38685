"""Capture: the training step's forward and loss as Dynamo sees it, for AOTAutograd's joint trace.

`compile_train_step` traces `loss_fn(model(x), y)` with Dynamo (torch.export, strict) before AOTAutograd
builds the joint forward+backward graph from the captured ATen graph. Under Dynamo, libraries take their
compile-time paths (`torch.compiler.is_compiling()` is true: `transformers`' mask construction, for
example, skips its data-dependent checks), so whatever `torch.compile(model, fullgraph=True)` accepts is
accepted here. Code Dynamo cannot put in one graph is a ConfigError naming the line of model code.
"""
from __future__ import annotations

import os
import traceback
import warnings

import torch
import torch.fx as fx

from ._torch import Unsupported, UserError
from .errors import ConfigError

_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(error: BaseException) -> str:
    """'file:line (code)' of the innermost frame outside torch where Dynamo stopped, or ''."""
    stack = list(getattr(error, "real_stack", None) or traceback.extract_tb(error.__traceback__))
    frames = [f for f in stack if not f.filename.startswith(_TORCH_DIR) and "/sparsecc/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({(f.line or '').strip()})"


def _reason(error: BaseException) -> str:
    """The first line of Dynamo's explanation (its message continues with hints and a developer context)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def capture(module: torch.nn.Module, leaves: list[torch.Tensor]) -> fx.GraphModule:
    """module(*leaves) captured by Dynamo as one ATen graph, parameters and buffers under their own names.
    Raises ConfigError, naming the line of model code, where Dynamo cannot capture it in one graph."""
    try:
        with warnings.catch_warnings():
            # Dynamo lists library globals a forward writes (transformers' output-capturing hooks record
            # into a module-level collector); they do not reach the graph, which is all we take from it.
            warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
            exported = torch.export.export(module, tuple(leaves), strict=True)
    except (Unsupported, UserError,
            torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode) as e:
        where = _user_frame(e)
        raise ConfigError(
            f"sparsecc cannot capture the training step in one graph: Dynamo stops"
            f"{' at ' + where if where else ''}: {_reason(e)}. Make that code traceable (torch.where or "
            f"torch.cond instead of a data-dependent `if`, no .item(), print or .tolist() in the forward), or "
            f"train with torch.compile(model, backend='sparsecc'), which allows graph breaks") from e
    return _constants_as_buffers(exported.module())


def _constants_as_buffers(gm: fx.GraphModule) -> fx.GraphModule:
    """Tensors the forward reads that are neither parameters nor buffers (a class-weight tensor a loss
    function closes over, a tensor attribute of a module) become buffers, so the joint trace takes every
    tensor as an input."""
    buffers = dict(gm.named_buffers())
    for node in gm.graph.find_nodes(op="get_attr"):
        owner, _, attr = node.target.rpartition(".")
        module = gm.get_submodule(owner)
        value = getattr(module, attr)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and node.target not in buffers:
            delattr(module, attr)
            module.register_buffer(attr, value)
    return gm
