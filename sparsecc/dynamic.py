"""Dynamic sparse training: move (RigL, SET) or shrink (gradual magnitude pruning) the masks of sparse
weights while training, without recompiling.

Every update keeps each weight's stored count, so shapes stay static: the compiled graphs read the masks
and index tensors as inputs, which are rewritten in place (sparse_weights.SparseWeight.set_mask).

    rigl       drop the f(t) fraction of live entries with the smallest |w|; grow as many among the entries
               that were dead before the update, those with the largest |dense gradient| (Evci et al. 2020).
               f(t) = drop_fraction / 2 * (1 + cos(pi * t / end_step)).
    set        the same drop; grow at random (Mocanu et al. 2018).
    magnitude  gradual magnitude pruning (Zhu & Gupta 2017): live density follows
               d(t) = final + (initial - final) * (1 - t / end_step)^3, dropping the smallest |w|. The compiled
               kernels keep computing the initial support (dropped entries are multiplied by zero).
Blocks patterns are scored per block (sum of squares); grown entries start at zero; the optimizer state of
every dead entry is zeroed so that no update brings it back.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch

from .errors import ConfigError, closest
from .sparse_registry import registered

_METHODS = ("rigl", "set", "magnitude")


@dataclass(frozen=True)
class DynamicSparsity:
    method: str
    every: int
    end_step: int
    drop_fraction: float = 0.3
    final_density: float | None = None
    seed: int = 0
    params: str = "*"               # fnmatch pattern: which sparse weights move (others keep their masks)

    def __post_init__(self):
        if self.method not in _METHODS:
            raise ConfigError(f"DynamicSparsity method must be one of {_METHODS}, got {self.method!r}")
        for key in ("every", "end_step"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"DynamicSparsity {key} must be a positive integer, got {v!r}")
        if not 0 < self.drop_fraction < 1:
            raise ConfigError(f"DynamicSparsity drop_fraction must be in (0, 1), got {self.drop_fraction!r}")
        if (self.method == "magnitude") != (self.final_density is not None):
            raise ConfigError("DynamicSparsity final_density is required for method='magnitude' and only for it")
        if self.final_density is not None and not 0 < self.final_density <= 1:
            raise ConfigError(f"DynamicSparsity final_density must be in (0, 1], got {self.final_density!r}")

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0 and step < self.end_step

    def drop_fraction_at(self, step: int) -> float:
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * min(step, self.end_step) / self.end_step))

    def density_at(self, step: int, initial: float) -> float:
        return self.final_density + (initial - self.final_density) * (1 - min(step, self.end_step) / self.end_step) ** 3

    @staticmethod
    def dense_grads(model: torch.nn.Module, closure) -> dict[str, torch.Tensor]:
        """Gradients of closure()'s loss at every entry of each sparse weight (dead ones included), from
        the uncompiled model: what RigL grows by. Runs every `every` steps, so its dense cost is amortised."""
        params = dict(model.named_parameters(remove_duplicate=False))
        names = [n for n in getattr(model, "sparsecc_masks", {}) if n in params]
        with torch.enable_grad():
            loss = closure()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}

    @torch.no_grad()
    def step(self, model: torch.nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None,
             grads: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        """Update every sparse weight's mask if step is an update step. Returns name -> entries changed."""
        masks = getattr(model, "sparsecc_masks", None)
        if not masks:
            raise ConfigError("DynamicSparsity.step: the model has no sparse weights; call sparsecc.sparsify first")
        moving = {n: m for n, m in masks.items() if fnmatch.fnmatchcase(n, self.params)}
        if not moving:
            raise ConfigError(f"DynamicSparsity params={self.params!r} matches no sparse weight."
                              f"{closest(self.params, masks)}")
        for name in moving:
            if not model.sparsecc_patterns[name].movable:
                raise ConfigError(f"DynamicSparsity cannot move {name!r}: {model.sparsecc_patterns[name]} fixes where "
                                  f"its entries may be (an NM pattern: the count per group); use Unstructured or "
                                  f"Blocks, or leave it out with params=")
        if not self.due(step):
            return {}
        if self.method == "rigl" and grads is None:
            raise ConfigError("DynamicSparsity(method='rigl') grows by dense gradients: pass "
                              "grads=DynamicSparsity.dense_grads(model, closure)")
        params = dict(model.named_parameters(remove_duplicate=False))
        changed = {}
        for name, mask in moving.items():
            pattern = model.sparsecc_patterns[name]
            w, compiled = params[name], registered(params[name])
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            support = compiled[0].support if compiled else mask     # every graph compiled this count
            new = self.update(mask, w, None if grads is None else grads[name], pattern, step, gen, support)
            changed[name] = int((new != mask).sum())
            w.mul_(new)
            if optimizer is not None:
                for state in optimizer.state.get(w, {}).values():
                    if isinstance(state, torch.Tensor) and state.shape == w.shape:
                        state.mul_(new)
            for sw in compiled:
                sw.set_mask(new, support=None if self.method == "magnitude" else new)
            mask.copy_(new)
        return changed

    def update(self, mask, weight, grad, pattern, step, gen, support) -> torch.Tensor:
        """The new mask of one weight (pure: nothing is written)."""
        b = pattern.unit
        live, w_score = _units(mask, b, "any"), _units(weight.square(), b, "sum")
        if self.method == "magnitude":
            initial = _units(support, b, "any").float().mean().item()
            target = max(1, round(self.density_at(step, initial) * live.numel()))
            drop = max(0, int(live.sum()) - target)
            return _expand(_drop(live, w_score, drop), b, mask.shape)
        n = round(self.drop_fraction_at(step) * int(live.sum()))
        kept = _drop(live, w_score, n)
        if self.method == "rigl":
            g_score = _units(grad.square(), b, "sum")
        else:
            g_score = torch.rand(live.shape, generator=gen).to(live.device)
        g_score = g_score.masked_fill(live, -math.inf)   # only entries dead before the update can grow
        grow = torch.zeros_like(live)
        if n:
            grow.view(-1)[g_score.flatten().topk(n).indices] = True
        return _expand(kept | grow, b, mask.shape)


def _units(t: torch.Tensor, b: int, how: str) -> torch.Tensor:
    """Per entry (b = 1) or per b x b block of a weight viewed as [out, in]."""
    m = t.reshape(t.shape[0], -1)
    if b == 1:
        return m.clone()
    blocks = m.reshape(m.shape[0] // b, b, m.shape[1] // b, b)
    return blocks.any(3).any(1) if how == "any" else blocks.sum((1, 3))


def _expand(units: torch.Tensor, b: int, shape) -> torch.Tensor:
    return units.repeat_interleave(b, 0).repeat_interleave(b, 1).reshape(shape)


def _drop(live: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    """live without its n lowest-scoring units."""
    out = live.clone()
    if n:
        out.view(-1)[score.masked_fill(~live, math.inf).flatten().topk(n, largest=False).indices] = False
    return out
