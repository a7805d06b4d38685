"""sparsecc: a compiler for sparse training of PyTorch models.

The public names below are imported from their submodules on first use, so `import sparsecc` (and the
`sparsecc` command's --help) does not pay for importing torch, Dynamo and Inductor until something needs them.
"""
from __future__ import annotations

import sys
import types

from ._lazy import exports

_EXPORTS = {   # public name -> the submodule that defines it
    "UnsupportedGraphError": "backend", "backend": "backend",
    "Channels": "config", "Config": "config", "ConfigError": "config", "UpdateScheme": "config",
    "DynamicSparsity": "dynamic",
    "data_parallel": "distributed", "fully_shard": "distributed",
    "explain": "explain",
    "ArtifactError": "export", "Runner": "export", "load": "export", "save": "export",
    "SGD": "optim", "AdamW": "optim",
    "Report": "report", "reports": "report",
    "SearchReport": "search", "search_scheme": "search",
    "NM": "sparsity", "Blocks": "sparsity", "Sparsity": "sparsity", "Unstructured": "sparsity", "sparsify": "sparsity",
    "TrainStep": "train_step", "compile_train_step": "train_step",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """Importing the submodule sparsecc.backend (or sparsecc.explain) binds it on the package under the name of
    the function it defines; the package keeps the function, as an eager `from .backend import backend` did."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and \
                value.__name__ == f"{__name__}.{name}" and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
