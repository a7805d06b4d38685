"""Which compiled graphs' SparseWeights read a parameter, so that sparsecc.sparsify and DynamicSparsity can move
their masks in place (no recompilation). Weak on both sides: a graph's SparseWeight lives as long as the
compiled graph (torch._dynamo.reset() frees it). Its own module so that sparsity.py needs no sparse_weights.py."""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from .sparse_weights import SparseWeight

_REGISTRY = WeakIdKeyDictionary()


def registered(param: torch.Tensor) -> list[SparseWeight]:
    return list(_REGISTRY.get(param, ()))


def register(param: torch.Tensor, sw: SparseWeight) -> SparseWeight:
    _REGISTRY.setdefault(param, weakref.WeakSet()).add(sw)
    return sw
