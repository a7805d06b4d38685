"""A sparse weight at run time, and the functions the sparsify pass puts in place of dense linear/conv calls.

A SparseWeight owns
    support  bool, the weight's shape: the entries the compiled kernels compute (fixed count: static shapes)
    mask     bool, a subset of support: the entries that are live (gradual magnitude pruning shrinks it)
    index    the compressed format's index tensors (graph inputs; refreshed in place, never reallocated)
    keep     float [nnz]: mask at the support's entries (multiplies the gathered values)
    dense    float, the weight's shape: the mask for uses that stay dense
Because all of these are graph inputs updated in place, a mask update never recompiles.

Formats: "blocks" (square blocks, sparsecc::block_sparse_mm) for Blocks patterns; "csr" for NM patterns
(sparsecc::nm_mm: N entries in every group of M, so the Triton path reads the CSR as ELL), Unstructured
patterns and masks picked up from torch.nn.utils.prune / parametrize (sparsecc::csr_mm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.block_sparse import block_index, block_values
from .ops.csr import to_csr
from .sparsity import NM, Blocks, Pattern

_CSR_KEYS = ("flat", "crow", "col", "t_crow", "t_col", "t_perm")
_BLOCK_KEYS = ("rows", "cols")


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
    def format(self) -> str:
        return "blocks" if isinstance(self.pattern, Blocks) else "csr"

    @property
    def block(self) -> int:
        return self.pattern.size if isinstance(self.pattern, Blocks) else 1

    @property
    def op(self) -> str:
        """The sparsecc:: forward op of a rewritten call."""
        return "block_sparse_mm" if self.format == "blocks" else "nm_mm" if isinstance(self.pattern, NM) else "csr_mm"

    @property
    def static_arg(self) -> int:
        """The constant a rewritten call passes: the block size (blocks), M (N:M) or 0 (unstructured CSR)."""
        return self.pattern.m if isinstance(self.pattern, NM) else self.block if self.format == "blocks" else 0

    @property
    def nnz(self) -> int:
        """Stored entries: blocks for "blocks", scalars for "csr"."""
        return self.index["rows" if self.format == "blocks" else "flat"].shape[0]

    @property
    def density(self) -> float:
        return self.support.float().mean().item()

    def describe(self) -> str:
        kind = f"blocks {self.block}x{self.block}" if self.format == "blocks" else "CSR"
        return f"{kind}, {self.pattern}, density {self.density:.3f}"

    def _index(self, support: torch.Tensor) -> dict[str, torch.Tensor]:
        m = _matrix(support)
        if isinstance(self.pattern, NM) and (m.reshape(m.shape[0], -1, self.pattern.m).sum(2) != self.pattern.n).any():
            raise ValueError(f"{self.name}: the support is not {self.pattern} (every group of {self.pattern.m} "
                             f"inputs must hold exactly {self.pattern.n} entries)")
        if isinstance(self.pattern, NM) and self.pattern.transposable and \
                (m.t().reshape(m.shape[1], -1, self.pattern.m).sum(2) != self.pattern.n).any():
            raise ValueError(f"{self.name}: the support is not {self.pattern} (its transpose must be "
                             f"{self.pattern.n}:{self.pattern.m} too)")
        return dict(zip(_BLOCK_KEYS, block_index(m, self.block))) if self.format == "blocks" else to_csr(m)

    def inputs(self) -> list[torch.Tensor]:
        """The graph inputs a rewritten op reads, in the order its function takes them."""
        keys = _BLOCK_KEYS if self.format == "blocks" else _CSR_KEYS
        return [self.keep] + [self.index[k] for k in keys]

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
                                 f"({self.nnz} {'blocks' if self.format == 'blocks' else 'entries'})")
            self.support.copy_(support)
            for k, t in index.items():
                self.index[k].copy_(t)
        self.mask.copy_(mask)
        self.dense.copy_(mask)
        live = self.gather(mask.to(self.keep.dtype))          # per stored entry; per block: any entry live
        self.keep.copy_(live.amax((1, 2)) if self.format == "blocks" else live)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored values of a weight-shaped tensor (eager; graphs use the same code via the functions below)."""
        keys = _BLOCK_KEYS if self.format == "blocks" else ("flat",)
        return _values(self.format, _matrix(weight), self.block, [self.index[k] for k in keys])


# ---- what rewritten graphs call -------------------------------------------------------------------------------

def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def _values(fmt: str, w: torch.Tensor, b: int, index: list[torch.Tensor]) -> torch.Tensor:
    if fmt == "blocks":
        return block_values(w, *index, b)
    (flat,) = index
    return w.reshape(-1)[flat]


def _linear(x, w, bias, mm):
    """linear(x, w, bias) with x's leading dims flattened for mm: [tokens, in] -> [tokens, out]."""
    y = mm(x.reshape(-1, w.shape[1])).reshape(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


def block_linear(x, weight, bias, b: int, keep, rows, cols):
    """linear(x, weight, bias) computed on the weight's kept b x b blocks only."""
    w = _matrix(weight)
    values = _values("blocks", w, b, [rows, cols]) * keep[:, None, None]
    return _linear(x, w, bias, lambda x2: torch.ops.sparsecc.block_sparse_mm(x2, values, rows, cols, w.shape[0]))


def csr_linear(x, weight, bias, m: int, keep, flat, crow, col, t_crow, t_col, t_perm):
    """linear(x, weight, bias) computed on the weight's stored (CSR) entries only: sparsecc::nm_mm for an N:M
    support (m = M), sparsecc::csr_mm for any other (m = 0)."""
    w = _matrix(weight)
    values = _values("csr", w, 1, [flat]) * keep
    index = (crow, col, t_crow, t_col, t_perm)
    if m:
        return _linear(x, w, bias, lambda x2: torch.ops.sparsecc.nm_mm(x2, values, *index, w.shape[0], m))
    return _linear(x, w, bias, lambda x2: torch.ops.sparsecc.csr_mm(x2, values, *index, w.shape[0]))


def conv1x1(fmt: str, x, weight, bias, *args):
    """A 1x1, stride-1, unpadded, ungrouped convolution as a linear over the channel dimension."""
    return LINEAR[fmt](x.movedim(1, -1), weight, bias, *args).movedim(-1, 1)


LINEAR = {"blocks": block_linear, "csr": csr_linear}
