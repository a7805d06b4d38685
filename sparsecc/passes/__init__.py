"""Graph passes over the joint forward+backward graph. Each is a pure function (GraphModule, Plan) -> PassResult
that rewrites the graph in place and says what it changed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ParamPlan:
    """One trainable input of the joint graph and the rule the scheme gives it."""

    name: str
    index: int                      # position among the joint graph's primals
    rule: object                    # "full" | "frozen" | Channels
    shape: tuple[int, ...]
    indices: torch.Tensor | None = None   # Channels(select="magnitude"): the chosen channels
    sparse: bool = False            # a sparse weight: its gradient is computed at the stored entries only


@dataclass(frozen=True)
class Plan:
    """What the passes need to know about one compilation."""

    params: tuple[ParamPlan, ...]
    num_fwd_outputs: int
    optimizer: object = None        # sparsecc.SGD / AdamW when the graph is a whole training step
    comm: tuple | None = None       # data-parallel step: (process group name, world size, bucket bytes)

    @classmethod
    def build(cls, inputs, rules: dict, channels: dict, sparse: set, num_fwd_outputs: int, optimizer=None,
              comm=None) -> "Plan":
        """The plan of a joint graph, as both entry points build it: `inputs` lists (primal index, parameter
        name, shape) of its parameter inputs; rules maps names to "full" | "frozen" | Channels (a name without
        a rule, such as the second name of a tied weight, is frozen: its gradient goes to the first name);
        channels maps names to the selected channels of a Channels rule; sparse names the sparse weights."""
        return cls(tuple(ParamPlan(name, i, rules.get(name, "frozen"), tuple(shape), channels.get(name),
                                   name in sparse) for i, name, shape in inputs), num_fwd_outputs, optimizer, comm)

    def grad_position(self, p: ParamPlan) -> int:
        """Where the gradient of p sits among the joint graph's flat outputs."""
        return self.num_fwd_outputs + p.index


@dataclass
class PassResult:
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)      # what was done, per parameter
    seconds: float = 0.0                                 # how long the pass took (set by the pipeline)
