"""Sparse weight patterns (N:M, blocks, unstructured), their validation, and magnitude pruning to them.

A pattern is a frozen dataclass; `Sparsity` maps fnmatch patterns over parameter names to patterns;
`sparsify(model, spec)` prunes each matched weight by magnitude within its pattern and records the
pattern and mask on the model, so a later compilation knows which entries must stay exactly zero.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Union

import torch

from .config import ConfigError, closest


def _density(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value <= 1:
        raise ConfigError(f"{name} density must be in (0, 1], got {value!r}")


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as [out, in]: a conv's kernel dims fold into its input dimension."""
    return weight.detach().reshape(weight.shape[0], -1)


@dataclass(frozen=True)
class NM:
    """N nonzeros in every group of M consecutive input-dimension entries (2:4 is NVIDIA's sparse tensor core format)."""

    n: int
    m: int

    def __post_init__(self):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m)) or self.n < 1:
            raise ConfigError(f"NM needs positive integers, got NM({self.n!r}, {self.m!r})")
        if self.n >= self.m:
            raise ConfigError(f"NM({self.n}, {self.m}): N must be smaller than M (N >= M is not sparse)")

    @property
    def density(self) -> float:
        return self.n / self.m

    def check(self, name: str, weight: torch.Tensor) -> None:
        cols = _matrix(weight).shape[1]
        if cols % self.m:
            raise ConfigError(f"Sparsity for {name!r}: NM({self.n}, {self.m}) groups the {cols} input entries "
                              f"by {self.m}, which does not divide them")

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        w = _matrix(weight).abs().reshape(weight.shape[0], -1, self.m)
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(2, w.topk(self.n, dim=2).indices, True)
        return keep.reshape(weight.shape)


@dataclass(frozen=True)
class Blocks:
    """Square blocks of size x size, the `density` fraction of them with the largest norms kept."""

    size: int
    density: float

    def __post_init__(self):
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"Blocks size must be a positive integer, got {self.size!r}")
        _density("Blocks", self.density)

    def check(self, name: str, weight: torch.Tensor) -> None:
        rows, cols = _matrix(weight).shape
        if rows % self.size or cols % self.size:
            raise ConfigError(f"Sparsity for {name!r}: Blocks({self.size}) does not divide the weight's "
                              f"{rows}x{cols} matrix")

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = _matrix(weight).shape
        b = self.size
        norms = _matrix(weight).reshape(rows // b, b, cols // b, b).square().sum((1, 3))
        k = max(1, math.ceil(self.density * norms.numel() - 1e-9))
        keep = torch.zeros(norms.numel(), dtype=torch.bool)
        keep[norms.flatten().topk(k).indices] = True
        return keep.reshape(rows // b, 1, cols // b, 1).expand(-1, b, -1, b).reshape(weight.shape)


@dataclass(frozen=True)
class Unstructured:
    """The `density` fraction of entries with the largest magnitudes in the whole tensor kept."""

    density: float

    def __post_init__(self):
        _density("Unstructured", self.density)

    def check(self, name: str, weight: torch.Tensor) -> None:
        pass  # any shape

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        k = max(1, math.ceil(self.density * weight.numel() - 1e-9))
        keep = torch.zeros(weight.numel(), dtype=torch.bool)
        keep[weight.detach().abs().flatten().topk(k).indices] = True
        return keep.reshape(weight.shape)


Pattern = Union[NM, Blocks, Unstructured]


@dataclass(frozen=True)
class Sparsity:
    """Which weights are sparse, and in what pattern; the first matching fnmatch pattern wins."""

    rules: Mapping[str, Pattern]

    def __post_init__(self):
        if not isinstance(self.rules, Mapping):
            raise ConfigError(f"Sparsity rules must be a dict of pattern -> NM/Blocks/Unstructured, got {type(self.rules).__name__}")
        for key, pattern in self.rules.items():
            if not isinstance(pattern, (NM, Blocks, Unstructured)):
                raise ConfigError(f"Sparsity rule for {key!r} must be sparsecc.NM, Blocks or Unstructured, got {pattern!r}")
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))

    def resolve(self, params: Mapping[str, torch.Tensor]) -> dict[str, Pattern]:
        """name -> pattern for every sparse weight, validated: each key matches a weight (>= 2-D) whose
        shape the pattern divides."""
        names = list(params)
        resolved = {}
        for key, pattern in self.rules.items():
            matched = [n for n in names if fnmatch.fnmatchcase(n, key)]
            if not matched:
                raise ConfigError(f"Sparsity pattern {key!r} matches no parameter.{closest(key, names)}")
            for name in matched:
                if name in resolved:
                    continue
                if params[name].dim() < 2:
                    raise ConfigError(f"Sparsity for {name!r} (key {key!r}): a {params[name].dim()}-D parameter is "
                                      f"not a weight; sparsity applies to linear, conv and embedding weights")
                if not params[name].is_floating_point():
                    raise ConfigError(f"Sparsity for {name!r}: dtype {params[name].dtype} is not floating point")
                pattern.check(name, params[name])
                resolved[name] = pattern
        return resolved


@torch.no_grad()
def sparsify(model: torch.nn.Module, spec: Sparsity) -> dict[str, torch.Tensor]:
    """Prune every weight spec names to its pattern by magnitude (in place) and record the masks on the
    model (`model.sparsecc_masks`, name -> bool mask). Validates everything before changing anything.
    A weight that compiled graphs already use is re-pruned in place when its stored count stays the same
    (the graphs follow, no recompilation); a new count needs the graphs dropped first (torch._dynamo.reset())."""
    from .sparse_weights import registered
    if not isinstance(spec, Sparsity):
        raise ConfigError(f"sparsify needs a sparsecc.Sparsity, got {type(spec).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))    # tied weights under every name
    patterns = spec.resolve(params)
    masks = {name: pattern.mask(params[name]).to(params[name].device) for name, pattern in patterns.items()}
    for name, mask in masks.items():
        for sw in registered(params[name]):
            if sw.pattern != patterns[name]:
                raise ConfigError(f"{name!r} is compiled as {sw.pattern}; re-sparsifying it as {patterns[name]} "
                                  f"needs a recompilation: call torch._dynamo.reset() first")
    for name, mask in masks.items():
        params[name].mul_(mask)
        for sw in registered(params[name]):
            sw.set_mask(mask, support=mask)
    model.sparsecc_masks = {**getattr(model, "sparsecc_masks", {}), **masks}
    model.sparsecc_patterns = {**getattr(model, "sparsecc_patterns", {}), **patterns}
    return masks
