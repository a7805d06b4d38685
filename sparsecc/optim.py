"""Optimizers of a compiled training step: frozen configs with the functional update each one traces into
the graph. Semantics are those of torch.optim applied to the reference gradients."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError


def _check(name: str, value, low: float, high: float = math.inf, *, open_low=False, open_high=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ConfigError(f"optimizer {name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")


@dataclass(frozen=True)
class SGD:
    """torch.optim.SGD (no dampening): momentum buffers start at zero, which equals torch's first-step copy."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        _check("lr", self.lr, 0.0)
        _check("momentum", self.momentum, 0.0, 1.0, open_high=True)
        _check("weight_decay", self.weight_decay, 0.0)
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optimizer nesterov=True needs momentum > 0")

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def update(self, p, g, lr, step, *state):
        """(new parameter, *new state) for one tensor; lr and step are 0-d tensors."""
        d = g + self.weight_decay * p if self.weight_decay else g
        if not self.momentum:
            return (p - lr * d,)
        buf = state[0] * self.momentum + d
        d = d + self.momentum * buf if self.nesterov else buf
        return p - lr * d, buf


@dataclass(frozen=True)
class AdamW:
    """torch.optim.AdamW (amsgrad=False)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self):
        _check("lr", self.lr, 0.0)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ConfigError(f"optimizer betas must be a pair of numbers in [0, 1), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            _check(f"betas[{i}]", b, 0.0, 1.0, open_high=True)
        _check("eps", self.eps, 0.0, open_low=True)
        _check("weight_decay", self.weight_decay, 0.0)
        object.__setattr__(self, "betas", tuple(self.betas))

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def update(self, p, g, lr, step, exp_avg, exp_avg_sq):
        b1, b2 = self.betas
        p = p * (1 - lr * self.weight_decay)
        exp_avg = exp_avg.lerp(g, 1 - b1)
        exp_avg_sq = exp_avg_sq * b2 + (1 - b2) * g * g
        bias_correction1 = 1 - torch.pow(b1, step)
        bias_correction2_sqrt = torch.sqrt(1 - torch.pow(b2, step))
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + self.eps
        return p - (lr / bias_correction1) * (exp_avg / denom), exp_avg, exp_avg_sq


Optimizer = SGD | AdamW
