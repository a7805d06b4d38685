"""Deployable artifacts: save a compiled training step, load and train from it without the model's code.

Names are imported from their submodules on first use: `sparsecc inspect` reads an artifact through
`archive` alone, without importing torch."""
from __future__ import annotations

from .._lazy import exports

_EXPORTS = {"ArtifactError": "archive", "Runner": "artifact", "TARGETS": "artifact", "load": "artifact",
            "save": "artifact", "fetch_iree_run_module": "iree"}

__all__ = ["ArtifactError", "Runner", "TARGETS", "fetch_iree_run_module", "load", "save"]


__getattr__, __dir__ = exports(__name__, _EXPORTS)
