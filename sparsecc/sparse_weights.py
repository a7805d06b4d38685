"""A sparse weight at run time, and the functions the sparsify pass puts in place of dense linear/conv calls.

A SparseWeight owns
    support  bool, the weight's shape: the entries the compiled kernels compute (fixed count: static shapes)
    mask     bool, a subset of support: the entries that are live (gradual magnitude pruning shrinks it)
    index    the compressed format's index tensors (graph inputs; refreshed in place, never reallocated)
    keep     float [nnz]: mask at the support's entries (multiplies the gathered values)
    dense    float, the weight's shape: the mask for uses that stay dense
Because all of these are graph inputs updated in place, a mask update never recompiles.

Formats (FORMATS below): "blocks" (square blocks, sparsecc::block_sparse_mm) and "csr" (entries: sparsecc::csr_mm,
or sparsecc::nm_mm for an N:M support, whose Triton path reads the CSR as ELL). A pattern names its format
(sparsity.Pattern); masks picked up from torch.nn.utils.prune / parametrize are stored as Unstructured CSR.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .ops.block_sparse import block_index, block_values
from .ops.csr import to_csr
from .sparsity import Pattern, matrix


@dataclass(frozen=True)
class Format:
    """A compressed layout of a sparse weight and the functions that read it."""

    name: str
    keys: tuple[str, ...]          # its index tensors, in the order its rewritten call takes them
    gather_keys: tuple[str, ...]   # those the stored values are gathered by (the first counts them)
    stored: str                    # what one stored item is: "blocks" or "entries"
    build: Callable                # (bool matrix [out, in], block) -> {key: index tensor}
    values: Callable               # (weight matrix, block, [gather index tensors]) -> stored values (differentiable)
    linear: Callable               # what a rewritten linear calls: (x, weight, bias, static_arg, keep, *index)
    steps: Callable                # (index dict, values, x, g, out, inp, block) -> a callable running forward +
                                   # both gradients on its kernels (the cost model times it)


@dataclass(eq=False)      # identity semantics: held in weak sets (sparse_registry)
class SparseWeight:
    name: str
    pattern: Pattern
    support: torch.Tensor
    mask: torch.Tensor
    index: dict[str, torch.Tensor]
    keep: torch.Tensor
    dense: torch.Tensor

    @classmethod
    def create(cls, name: str, pattern: Pattern, mask: torch.Tensor, dtype: torch.dtype) -> "SparseWeight":
        mask = mask.detach().to(torch.bool)
        sw = cls(name, pattern, mask.clone(), mask.clone(), {}, torch.empty(0), mask.to(dtype))
        sw.index = sw._index(sw.support)
        sw.keep = torch.ones(sw.nnz, dtype=dtype, device=mask.device)
        return sw

    @property
    def format(self) -> Format:
        return FORMATS[self.pattern.format]

    @property
    def block(self) -> int:
        return self.pattern.unit if self.format.name == "blocks" else 1

    @property
    def nnz(self) -> int:
        """Stored items: blocks for "blocks", scalars for "csr"."""
        return self.index[self.format.gather_keys[0]].shape[0]

    @property
    def density(self) -> float:
        return self.support.float().mean().item()

    def describe(self) -> str:
        kind = f"blocks {self.block}x{self.block}" if self.format.name == "blocks" else "CSR"
        return f"{kind}, {self.pattern}, density {self.density:.3f}"

    def _index(self, support: torch.Tensor) -> dict[str, torch.Tensor]:
        m = matrix(support)
        self.pattern.check_support(self.name, m)
        return self.format.build(m, self.block)

    def inputs(self) -> list[torch.Tensor]:
        """The graph inputs a rewritten op reads, in the order its function takes them (input_names)."""
        return [self.keep] + [self.index[k] for k in self.format.keys]

    def input_names(self) -> tuple[str, ...]:
        return ("keep", *self.format.keys)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, *, support: torch.Tensor | None = None) -> None:
        """Move the live entries (and, with support=, the computed ones) in place, keeping every count."""
        support = self.support if support is None else support.to(torch.bool)
        if mask.shape != self.mask.shape or (mask & ~support).any():
            raise ValueError(f"{self.name}: the new mask must have shape {tuple(self.mask.shape)} and lie "
                             f"inside the support the graph was compiled for")
        if support is not self.support:
            index = self._index(support)
            if any(t.shape != self.index[k].shape for k, t in index.items()):
                raise ValueError(f"{self.name}: a mask update must keep the number of nonzeros "
                                 f"({self.nnz} {self.format.stored})")
            self.support.copy_(support)
            for k, t in index.items():
                self.index[k].copy_(t)
        self.mask.copy_(mask)
        self.dense.copy_(mask)
        live = self.gather(mask.to(self.keep.dtype))          # per stored entry; per block: any entry live
        self.keep.copy_(live.amax((1, 2)) if live.dim() == 3 else live)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored values of a weight-shaped tensor (eager; graphs use the same code via the functions below)."""
        return self.format.values(matrix(weight), self.block, [self.index[k] for k in self.format.gather_keys])


# ---- what rewritten graphs call -------------------------------------------------------------------------------

def _block_values(w: torch.Tensor, b: int, index: list[torch.Tensor]) -> torch.Tensor:
    return block_values(w, *index, b)


def _csr_values(w: torch.Tensor, b: int, index: list[torch.Tensor]) -> torch.Tensor:
    (flat,) = index
    return w.reshape(-1)[flat]


def _linear(x, w, bias, mm):
    """linear(x, w, bias) with x's leading dims flattened for mm: [tokens, in] -> [tokens, out]."""
    y = mm(x.reshape(-1, w.shape[1])).reshape(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


def block_linear(x, weight, bias, b: int, keep, rows, cols):
    """linear(x, weight, bias) computed on the weight's kept b x b blocks only."""
    w = matrix(weight)
    values = _block_values(w, b, [rows, cols]) * keep[:, None, None]
    return _linear(x, w, bias, lambda x2: torch.ops.sparsecc.block_sparse_mm(x2, values, rows, cols, w.shape[0]))


def csr_linear(x, weight, bias, m: int, keep, flat, crow, col, t_crow, t_col, t_perm):
    """linear(x, weight, bias) computed on the weight's stored (CSR) entries only: sparsecc::nm_mm for an N:M
    support (m = M), sparsecc::csr_mm for any other (m = 0)."""
    w = matrix(weight)
    values = _csr_values(w, 1, [flat]) * keep
    index = (crow, col, t_crow, t_col, t_perm)
    if m:
        return _linear(x, w, bias, lambda x2: torch.ops.sparsecc.nm_mm(x2, values, *index, w.shape[0], m))
    return _linear(x, w, bias, lambda x2: torch.ops.sparsecc.csr_mm(x2, values, *index, w.shape[0]))


def conv1x1(fmt: str, x, weight, bias, *args):
    """A 1x1, stride-1, unpadded, ungrouped convolution as a linear over the channel dimension."""
    return FORMATS[fmt].linear(x.movedim(1, -1), weight, bias, *args).movedim(-1, 1)


def _block_steps(i, values, x, g, out, inp, b):
    ops = torch.ops.sparsecc
    return lambda: (ops.block_sparse_mm(x, values, i["rows"], i["cols"], out),
                    ops.block_sparse_mm_t(g, values, i["rows"], i["cols"], inp),
                    ops.block_sddmm(g, x, i["rows"], i["cols"], b))


def _csr_steps(i, values, x, g, out, inp, b):
    ops = torch.ops.sparsecc
    return lambda: (ops.csr_mm(x, values, i["crow"], i["col"], i["t_crow"], i["t_col"], i["t_perm"], out),
                    ops.csr_mm_t(g, values, i["t_crow"], i["t_col"], i["t_perm"], inp),
                    ops.csr_sddmm(g, x, i["crow"], i["col"]))


def operands(pattern, support: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """inputs() by input_names() of a weight whose support and mask are `support` (how an artifact's runner
    rebuilds them from the stored index)."""
    sw = SparseWeight.create("", pattern, support, dtype)
    return dict(zip(sw.input_names(), sw.inputs()))


FORMATS = {
    "blocks": Format("blocks", ("rows", "cols"), ("rows", "cols"), "blocks",
                     lambda m, b: dict(zip(("rows", "cols"), block_index(m, b))), _block_values, block_linear,
                     _block_steps),
    "csr": Format("csr", ("flat", "crow", "col", "t_crow", "t_col", "t_perm"), ("flat",), "entries",
                  lambda m, b: to_csr(m), _csr_values, csr_linear, _csr_steps),
}
