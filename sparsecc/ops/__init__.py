"""sparsecc:: custom ops: the seam between graphs and kernels (schema, fake implementation, kernel)."""
from __future__ import annotations

import torch


@torch.library.custom_op("sparsecc::index_constant", mutates_args=())
def index_constant(values: list[int], device: torch.device) -> torch.Tensor:
    """A compile-time constant index tensor, spelled out in the graph (no tensor attribute to lift)."""
    return torch.tensor(values, dtype=torch.int64, device=device)


@index_constant.register_fake
def _(values, device):
    return torch.empty(len(values), dtype=torch.int64, device=device)


from . import block_sparse, channels, csr, linear_cross_entropy, swiglu  # noqa: E402,F401  (register the sparsecc:: ops)
