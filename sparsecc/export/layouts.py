"""How a sparse weight is stored in an artifact: its kept values in row-major order plus a compact index.

    layout            index stored                                  bytes of index
    dense             -                                             0
    unstructured      int32 flat position of each value             4 per value
    nm:N:M            uint8 offset of each value inside its group    1 per value
    blocks:B          int32 flat id of each kept BxB block          4 per block

Programs take the values and the int64 flat positions (`expand`), so every format reaches every runtime
as two plain tensors; `compact` is the inverse used when saving. A host program that runs the sparse kernels
also reads their operands (`kernel_operands`): the runner derives them from the same positions when it loads.
"""
from __future__ import annotations

import torch

from ..sparse_weights import operands
from ..sparsity import NM, Blocks, Unstructured

DENSE = "dense"


def name(pattern) -> str:
    """The layout of a weight with this sparsity.Pattern (None: dense)."""
    return DENSE if pattern is None else pattern.layout


def _parse(layout: str) -> tuple[str, list[int]]:
    kind, *nums = layout.split(":")
    if kind not in ("unstructured", "nm", "blocks") or len(nums) != {"unstructured": 0, "nm": 2, "blocks": 1}[kind] \
            or not all(n.isdigit() and int(n) > 0 for n in nums):
        raise ValueError(f"unknown layout {layout!r}")
    return kind, [int(n) for n in nums]


def _blocks_grid(shape, b: int) -> tuple[int, int]:
    rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
    if rows % b or cols % b:
        raise ValueError(f"blocks:{b} does not tile a weight of shape {list(shape)}")
    return rows, cols


def compact(layout: str, flat: torch.Tensor, shape) -> torch.Tensor:
    """The stored index of a weight whose kept entries sit at the sorted int64 flat positions `flat`."""
    kind, nums = _parse(layout)
    if kind == "unstructured":
        return flat.to(torch.int32)
    if kind == "nm":
        return (flat % nums[1]).to(torch.uint8)
    b = nums[0]
    _, cols = _blocks_grid(shape, b)
    block = (flat // cols // b) * (cols // b) + (flat % cols) // b
    return torch.unique_consecutive(block[torch.argsort(block, stable=True)]).to(torch.int32)


def densify(values: torch.Tensor, flat: torch.Tensor, shape) -> torch.Tensor:
    """The dense weight whose kept entries, at the int64 flat positions `flat`, hold `values` (zeros elsewhere)."""
    return values.new_zeros(torch.Size(shape).numel()).index_put((flat,), values).view(shape)


def expand(layout: str, stored: torch.Tensor, shape) -> torch.Tensor:
    """Sorted int64 flat positions of the kept entries; ValueError when `stored` cannot be such an index."""
    kind, nums = _parse(layout)
    numel = int(torch.Size(shape).numel())
    stored = stored.to(torch.int64)
    if kind == "unstructured":
        flat = stored
    elif kind == "nm":
        n, m = nums
        if numel % m or stored.numel() != numel // m * n:
            raise ValueError(f"an nm:{n}:{m} index of a {list(shape)} weight has {numel // m * n} entries, "
                             f"not {stored.numel()}")
        if stored.numel() and not (0 <= int(stored.min()) and int(stored.max()) < m):
            raise ValueError(f"an nm:{n}:{m} offset lies outside its group of {m}")
        flat = torch.arange(stored.numel()) // n * m + stored
    else:
        b = nums[0]
        rows, cols = _blocks_grid(shape, b)
        if stored.numel() and not (0 <= int(stored.min()) and int(stored.max()) < rows * cols // (b * b)):
            raise ValueError(f"a block id lies outside the {rows // b}x{cols // b} block grid")
        r, c = stored // (cols // b), stored % (cols // b)
        inner = torch.arange(b)
        rr = (r[:, None, None] * b + inner[None, :, None]).expand(-1, b, b)
        cc = (c[:, None, None] * b + inner[None, None, :]).expand(-1, b, b)
        flat = (rr * cols + cc).reshape(-1).sort().values
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= numel or bool((flat[1:] <= flat[:-1]).any())):
        raise ValueError(f"the {layout} index is not a strictly increasing set of positions in a {list(shape)} weight")
    return flat


def kernel_operands(layout: str, flat: torch.Tensor, shape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The sparse kernels' operands (SparseWeight.input_names) of a weight stored in `layout` whose kept entries
    sit at the (expanded, checked) int64 flat positions `flat`: built exactly as the step that saved it built
    them, from the same mask."""
    kind, nums = _parse(layout)
    pattern = NM(*nums) if kind == "nm" else Blocks(nums[0], 1.0) if kind == "blocks" else Unstructured(1.0)
    support = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.bool)
    support[flat] = True
    return operands(pattern, support.view(shape), dtype)
