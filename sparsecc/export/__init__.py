"""Deployable artifacts: save a compiled training step, load and train from it without the model's code."""
from .archive import ArtifactError
from .artifact import TARGETS, Runner, load, save
from .iree import fetch_iree_run_module

__all__ = ["ArtifactError", "Runner", "TARGETS", "fetch_iree_run_module", "load", "save"]
