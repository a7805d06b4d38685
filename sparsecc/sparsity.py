"""Sparse weight patterns (N:M, blocks, unstructured), their validation, and magnitude pruning to them.

A pattern is a frozen dataclass subclassing `Pattern`, the protocol the rest of sparsecc reads (see its
docstring): adding one is a subclass here, plus kernels when it needs a compressed format sparse_weights.FORMATS
does not have. `Sparsity` maps fnmatch patterns over parameter names to patterns; `sparsify(model, spec)` prunes
each matched weight by magnitude within its pattern and records the pattern and mask on the model, so a later
compilation knows which entries must stay exactly zero.
"""
from __future__ import annotations

import fnmatch
import functools
import itertools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch

from .errors import ConfigError, closest, where_parameters_live
from .sparse_registry import registered


def _density(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value <= 1:
        raise ConfigError(f"{name} density must be in (0, 1], got {value!r}")


def matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as [out, in]: a conv's kernel dims fold into its input dimension (a view; differentiable)."""
    return weight.reshape(weight.shape[0], -1)


class Pattern:
    """What every sparse weight pattern tells the compiler. Subclasses are frozen dataclasses with a `density`
    and implement `check` (does the pattern fit this weight; ConfigError if not) and `mask` (the magnitude mask).
    Class attributes, defaults fitting any pattern stored entry by entry:
        format      the compressed layout its kernels read: "csr" (entries) or "blocks" (square blocks of `unit`);
                    sparse_weights.FORMATS holds each format's index, gather and rewritten-call functions
        op          the sparsecc:: forward op its rewritten linear calls (named in reports)
        static_arg  the constant that call passes: M of an N:M weight (sparsecc::nm_mm), the block size, or 0
        unit        side of the square unit it keeps or drops whole (DynamicSparsity scores per unit)
        movable     whether DynamicSparsity may move its live entries
        layout      how an artifact stores its index (export/layouts.py); "unstructured" (flat positions) fits any
    and check_support(name, matrix), which refuses a support a compiled graph cannot hold (N:M counts)."""

    format = "csr"
    op = "csr_mm"
    static_arg = 0
    unit = 1
    movable = True
    layout = "unstructured"

    def check_support(self, name: str, matrix: torch.Tensor) -> None:
        pass


@dataclass(frozen=True)
class NM(Pattern):
    """N nonzeros in every group of M consecutive input-dimension entries (2:4 is NVIDIA's sparse tensor core format).

    transposable=True: N:M along the rows *and* along the columns of every M x M tile, so the transposed weight
    is N:M too (the input gradient, which contracts along the other dimension of W, can then also run on sparse
    tensor cores). Chosen by magnitude: per tile, the one of the valid M x M masks (90 for 2:4) that keeps the
    largest sum of |w|. Needs M <= 4 (the masks are enumerated) and both dimensions divisible by M."""

    n: int
    m: int
    transposable: bool = False
    op = "nm_mm"
    movable = False          # the count per group is fixed

    @property
    def static_arg(self) -> int:
        return self.m

    @property
    def layout(self) -> str:
        return f"nm:{self.n}:{self.m}"

    def check_support(self, name: str, matrix: torch.Tensor) -> None:
        groups = [matrix] + ([matrix.t()] if self.transposable else [])
        for i, m in enumerate(groups):
            if (m.reshape(m.shape[0], -1, self.m).sum(2) != self.n).any():
                what = f"every group of {self.m} inputs must hold exactly {self.n} entries" if i == 0 else \
                    f"its transpose must be {self.n}:{self.m} too"
                raise ValueError(f"{name}: the support is not {self} ({what})")

    def __post_init__(self):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m)) or self.n < 1:
            raise ConfigError(f"NM needs positive integers, got NM({self.n!r}, {self.m!r})")
        if self.n >= self.m:
            raise ConfigError(f"NM({self.n}, {self.m}): N must be smaller than M (N >= M is not sparse)")
        if not isinstance(self.transposable, bool):
            raise ConfigError(f"NM transposable must be True or False, got {self.transposable!r}")
        if self.transposable and self.m > 4:
            raise ConfigError(f"NM({self.n}, {self.m}, transposable=True): transposable patterns need M <= 4 (every "
                              f"valid M x M tile mask is enumerated)")

    def __repr__(self) -> str:
        return f"NM(n={self.n}, m={self.m}{', transposable=True' if self.transposable else ''})"

    @property
    def density(self) -> float:
        return self.n / self.m

    def check(self, name: str, weight: torch.Tensor) -> None:
        rows, cols = matrix(weight).shape
        if cols % self.m:
            raise ConfigError(f"Sparsity for {name!r}: NM({self.n}, {self.m}) groups the {cols} input entries "
                              f"by {self.m}, which does not divide them")
        if self.transposable and rows % self.m:
            raise ConfigError(f"Sparsity for {name!r}: NM({self.n}, {self.m}, transposable=True) tiles the weight "
                              f"by {self.m} x {self.m}, which does not divide its {rows} rows")

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        if self.transposable:
            return transposable_mask(matrix(weight), self.n, self.m).reshape(weight.shape)
        w = matrix(weight.detach()).abs().reshape(weight.shape[0], -1, self.m)
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(2, w.topk(self.n, dim=2).indices, True)
        return keep.reshape(weight.shape)


@functools.lru_cache(maxsize=None)
def tile_masks(n: int, m: int) -> torch.Tensor:
    """Every m x m 0/1 matrix with exactly n ones in each row and each column, as bool [count, m, m] (90 for 2:4,
    24 for 1:4 and 3:4), in lexicographic order of their rows."""
    rows = [tuple(j in c for j in range(m)) for c in itertools.combinations(range(m), n)]
    tiles = [t for t in itertools.product(rows, repeat=m) if all(sum(r[j] for r in t) == n for j in range(m))]
    return torch.tensor(tiles, dtype=torch.bool)


def transposable_mask(matrix: torch.Tensor, n: int, m: int, chunk: int = 1 << 16) -> torch.Tensor:
    """The transposable N:M mask of a 2-D tensor: per m x m tile, the valid tile mask (tile_masks) with the largest
    kept sum of |w| (the first such in tile_masks' order on a tie). Vectorised: each tile's |w| times every mask,
    `chunk` tiles at a time."""
    rows, cols = matrix.shape
    masks = tile_masks(n, m)
    flat = masks.reshape(len(masks), m * m).to(torch.float64).t().to(matrix.device)
    tiles = matrix.detach().abs().to(torch.float64).reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3)
    tiles = tiles.reshape(-1, m * m)
    best = torch.cat([(tiles[i:i + chunk] @ flat).argmax(1) for i in range(0, tiles.shape[0], chunk)]) \
        if tiles.shape[0] else torch.zeros(0, dtype=torch.long, device=matrix.device)
    keep = masks.to(matrix.device)[best].reshape(rows // m, cols // m, m, m).permute(0, 2, 1, 3)
    return keep.reshape(rows, cols)


@dataclass(frozen=True)
class Blocks(Pattern):
    """Square blocks of size x size, the `density` fraction of them with the largest norms kept."""

    size: int
    density: float
    format = "blocks"
    op = "block_sparse_mm"

    @property
    def static_arg(self) -> int:
        return self.size

    @property
    def unit(self) -> int:
        return self.size

    @property
    def layout(self) -> str:
        return f"blocks:{self.size}"

    def __post_init__(self):
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"Blocks size must be a positive integer, got {self.size!r}")
        _density("Blocks", self.density)

    def check(self, name: str, weight: torch.Tensor) -> None:
        rows, cols = matrix(weight).shape
        if rows % self.size or cols % self.size:
            raise ConfigError(f"Sparsity for {name!r}: Blocks({self.size}) does not divide the weight's "
                              f"{rows}x{cols} matrix")

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = matrix(weight).shape
        b = self.size
        norms = matrix(weight.detach()).reshape(rows // b, b, cols // b, b).square().sum((1, 3))
        k = max(1, math.ceil(self.density * norms.numel() - 1e-9))
        keep = torch.zeros(norms.numel(), dtype=torch.bool)
        keep[norms.flatten().topk(k).indices] = True
        return keep.reshape(rows // b, 1, cols // b, 1).expand(-1, b, -1, b).reshape(weight.shape)


@dataclass(frozen=True)
class Unstructured(Pattern):
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


@dataclass(frozen=True)
class Sparsity:
    """Which weights are sparse, and in what pattern; the first matching fnmatch pattern wins."""

    rules: Mapping[str, Pattern]

    def __post_init__(self):
        if not isinstance(self.rules, Mapping):
            raise ConfigError(f"Sparsity rules must be a dict of pattern -> NM/Blocks/Unstructured, got {type(self.rules).__name__}")
        for key, pattern in self.rules.items():
            if not isinstance(pattern, Pattern):
                raise ConfigError(f"Sparsity rule for {key!r} must be sparsecc.NM, Blocks or Unstructured (or another "
                                  f"sparsecc.sparsity.Pattern), got {pattern!r}")
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))

    def resolve(self, params: Mapping[str, torch.Tensor]) -> dict[str, Pattern]:
        """name -> pattern for every sparse weight, validated: each key matches a weight (>= 2-D) whose
        shape the pattern divides."""
        names = list(params)
        resolved = {}
        for key, pattern in self.rules.items():
            matched = [n for n in names if fnmatch.fnmatchcase(n, key)]
            if not matched:
                raise ConfigError(f"Sparsity pattern {key!r} matches no parameter."
                                  f"{closest(key, names) or where_parameters_live(names)}")
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
