"""The calling convention shared by the training step, the artifact programs and the runner.

`x` is one input, a tuple of positional inputs or a dict of keyword inputs (ARCHITECTURE.md); a batch is
(x, y), y None when the model computes its own loss. A compiled graph takes the batch's tensors; its
structure — the pytree spec and the non-tensor leaves such as `return_dict=False` or a None target — is
part of what the graph was compiled for, like the tensors' shapes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils._pytree import (TreeSpec, keystr, tree_flatten, tree_flatten_with_path, tree_unflatten,
                                 treespec_dumps)

from .errors import ConfigError

_CONSTANTS = (type(None), bool, int, float, str)


def split_inputs(x) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call: a tuple is positional arguments, a dict keywords, anything else one input."""
    if isinstance(x, tuple):
        return x, {}
    if isinstance(x, dict):
        return (), x
    return (x,), {}


def call_model(model, x, tensors: dict[str, torch.Tensor] | None = None, **functional):
    """model called on x; with `tensors`, through torch.func.functional_call with those parameters/buffers."""
    args, kwargs = split_inputs(x)
    if tensors is None:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, tensors, args, kwargs, **functional)


def model_loss(out):
    """The loss a model computed itself (loss_fn=None; a `transformers` model given `labels=`): `out.loss` of
    an output object or dict, the first element of a tuple, or the output when it is one tensor."""
    if isinstance(out, Mapping):
        return out.get("loss")
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass(frozen=True)
class Structure:
    """How a flat list of tensors becomes the inputs again: the pytree spec and the constant leaves."""
    spec: TreeSpec
    constants: tuple[tuple[int, object], ...]     # (leaf position, value) of each non-tensor leaf

    def unflatten(self, tensors):
        tensors, constants = iter(tensors), dict(self.constants)
        leaves = [constants[i] if i in constants else next(tensors) for i in range(self.spec.num_leaves)]
        return tree_unflatten(leaves, self.spec)

    def dumps(self) -> str:
        return treespec_dumps(self.spec)

    def constants_json(self) -> list:
        return [[i, v] for i, v in self.constants]


def leaf_names(batch) -> list[str]:
    """A name per tensor leaf of a batch (x, y), in flatten's order: "x", "x[1]", "x['input_ids']", "y"."""
    names = []
    for path, leaf in tree_flatten_with_path(batch)[0]:
        if isinstance(leaf, torch.Tensor):
            names.append("xy"[path[0].idx] + keystr(path[1:]))
    return names


def flatten(value) -> tuple[list[torch.Tensor], Structure]:
    """The tensors of value (a batch or an input) and its structure. Leaves must be tensors or constants."""
    leaves, spec = tree_flatten(value)
    bad = sorted({type(leaf).__name__ for leaf in leaves if not isinstance(leaf, (torch.Tensor, *_CONSTANTS))})
    if bad:
        raise ConfigError(f"inputs must be tensors, or None/bool/int/float/str constants, in tuples and dicts; "
                          f"found {', '.join(bad)}")
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    constants = tuple((i, leaf) for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor))
    return tensors, Structure(spec, constants)


MASK_PREFIX = "sparsecc_mask_"   # the step's buffer holding a sparse weight's mask (weight * mask)


def first_alias(names: list[str], params: dict) -> list[int]:
    """For each exported name, the index of the first name of the same tensor (tied weights are exported
    once per name)."""
    first: dict[int, int] = {}
    return [first.setdefault(id(params[n]), i) for i, n in enumerate(names)]
