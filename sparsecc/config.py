"""User-facing configuration: which parameters are trained (UpdateScheme) and how the backend runs (Config).

Everything here is a frozen dataclass validated at construction; errors name the bad key and suggest
the nearest valid one.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Mapping, Union

import torch

from .errors import ConfigError, closest, parse_budget, where_parameters_live
from .sparsity import Sparsity


@dataclass(frozen=True)
class Channels:
    """Train only k = ceil(fraction * C) channels of a weight.

    dim="in" trains weight[:, sel] (input channels: dim 1 of a linear, conv or embedding weight),
    dim="out" trains weight[sel] (dim 0). select="first" takes channels 0..k-1; select="magnitude"
    takes the k channels of largest L2 norm, chosen once at compile time.
    """

    fraction: float
    dim: str = "in"
    select: str = "first"

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)):
            raise ConfigError(f"Channels fraction must be a number in (0, 1], got {self.fraction!r}")
        if not 0.0 < self.fraction <= 1.0 or math.isnan(self.fraction):
            raise ConfigError(f"Channels fraction must be in (0, 1], got {self.fraction!r}")
        if self.dim not in ("in", "out"):
            raise ConfigError(f"Channels dim must be 'in' or 'out', got {self.dim!r}.{closest(str(self.dim), ('in', 'out'))}")
        if self.select not in ("first", "magnitude"):
            raise ConfigError(
                f"Channels select must be 'first' or 'magnitude', got {self.select!r}."
                f"{closest(str(self.select), ('first', 'magnitude'))}")

    @property
    def axis(self) -> int:
        """The tensor dimension the channels live on."""
        return 1 if self.dim == "in" else 0

    def count(self, size: int) -> int:
        """k = ceil(fraction * size), at least 1."""
        return max(1, math.ceil(self.fraction * size - 1e-9))

    def indices(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The selected channel indices (sorted), or None for the first-k slice."""
        k = self.count(weight.shape[self.axis])
        if self.select == "first":
            return None
        w = weight.detach().float().transpose(0, self.axis).reshape(weight.shape[self.axis], -1)
        return torch.topk(w.norm(dim=1), k).indices.sort().values


Rule = Union[str, Channels]  # "full" | "frozen" | Channels


def rule_name(rule: Rule) -> str:
    return rule if isinstance(rule, str) else repr(rule)
_WORD_RULES = ("full", "frozen")


@dataclass(frozen=True)
class UpdateScheme:
    """Which parameters (or slices of them) are trained. The first matching fnmatch pattern wins;
    parameters no pattern matches get `default`."""

    rules: Mapping[str, Rule]
    default: str = "frozen"

    def __post_init__(self):
        if not isinstance(self.rules, Mapping):
            raise ConfigError(f"UpdateScheme rules must be a dict of pattern -> rule, got {type(self.rules).__name__}")
        for pattern, rule in self.rules.items():
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"UpdateScheme pattern must be a non-empty string, got {pattern!r}")
            if not (isinstance(rule, Channels) or rule in _WORD_RULES):
                raise ConfigError(
                    f"UpdateScheme rule for {pattern!r} must be 'full', 'frozen' or sparsecc.Channels(...), "
                    f"got {rule!r}.{closest(str(rule), _WORD_RULES)}")
        if self.default not in _WORD_RULES:
            raise ConfigError(f"UpdateScheme default must be 'full' or 'frozen', got {self.default!r}.{closest(str(self.default), _WORD_RULES)}")
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))

    @classmethod
    def full(cls) -> "UpdateScheme":
        """Train every parameter (plain full backprop)."""
        return cls({}, default="full")

    def match(self, name: str) -> Rule | None:
        """The rule of the first pattern matching name, or None when no pattern does."""
        for pattern, rule in self.rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return rule
        return None

    def rule_for(self, name: str) -> Rule:
        rule = self.match(name)
        return self.default if rule is None else rule

    def trained(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters of model this scheme trains (in full or some channels), each once: what to give a
        torch.optim optimizer (safer than `p.grad is not None`, which DDP breaks by zero-filling frozen grads)."""
        rules = self.resolve(dict(model.named_parameters(remove_duplicate=False)))
        return [p for n, p in model.named_parameters() if rules[n] != "frozen"]

    def resolve(self, params: Mapping[str, torch.Tensor], *, complete: bool = True) -> dict[str, Rule]:
        """Map every parameter name to its rule, validating the scheme against the parameters.

        Tied parameters (one tensor under several names) get the rule a pattern gives any of their names;
        two different explicit rules for one tensor are an error. complete=False is for a graph whose
        model is unknown, so params may be only some of its parameters: a pattern that matches none of
        them is then no error.
        """
        names = list(params)
        if complete:
            for pattern in self.rules:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise ConfigError(f"UpdateScheme pattern {pattern!r} matches no parameter."
                                      f"{_wrapper_prefix(pattern, names) or closest(pattern, names) or where_parameters_live(names)}")
        aliases: dict[int, list[str]] = {}
        for name, tensor in params.items():
            aliases.setdefault(id(tensor), []).append(name)
        resolved = {}
        for group in aliases.values():
            explicit = {n: r for n in group if (r := self.match(n)) is not None}
            if len(set(map(repr, explicit.values()))) > 1:
                raise ConfigError(f"tied parameters {sorted(explicit)} share one tensor but get different rules "
                                  f"{ {n: r for n, r in explicit.items()} }; give them one rule")
            rule = next(iter(explicit.values()), self.default)
            resolved.update({n: rule for n in group})
        for name, rule in resolved.items():
            if isinstance(rule, Channels) and params[name].dim() < 2:
                raise ConfigError(
                    f"Channels rule on {name!r}: the parameter is {params[name].dim()}-D {tuple(params[name].shape)}; "
                    f"Channels needs a weight with at least 2 dimensions (use 'full' for biases and norms)")
        if complete and names and all(r == "frozen" for r in resolved.values()):
            raise ConfigError(
                f"UpdateScheme trains nothing: every one of the {len(names)} parameters is frozen. "
                f"Add a rule such as {{'*.bias': 'full'}} or default='full'")
        return resolved

    def describe(self) -> str:
        body = ", ".join(f"{p!r}: {r!r}" for p, r in self.rules.items())
        return f"UpdateScheme({{{body}}}, default={self.default!r})"


def _wrapper_prefix(pattern: str, names: list[str]) -> str:
    """The hint for a pattern written with a wrapper's prefix (DDP's "module.", torch.compile's "_orig_mod.")."""
    for prefix in ("module.", "_orig_mod."):
        rest = pattern.removeprefix(prefix)
        if rest != pattern and any(fnmatch.fnmatchcase(n, rest) for n in names):
            return (f" Patterns name the model's own parameters, whatever wraps it (DDP, torch.compile): "
                    f"write {rest!r}, without {prefix!r}.")
    return ""


_EXECUTORS = ("inductor", "eager")
_COST_MODELS = ("measure", "off", "dense")


@dataclass(frozen=True)
class Config:
    """Every option the backend accepts (`options=` of torch.compile, or keywords of sparsecc.backend).

    update: which parameters are trained; None trains everything, as plain autograd does.
    executor: "inductor" compiles forward and backward with Inductor; "eager" runs the FX graphs
        as they are (fast compiles, for debugging).
    sparsity: the sparsecc.Sparsity the model was sparsified with (checked against what sparsify recorded);
        None uses whatever the model records, plus masks from torch.nn.utils.prune / parametrize.
    cost_model: "measure" rewrites a call to a sparse op only where measurement on this machine shows the
        sparse kernels faster; "off" rewrites every call it can; "dense" none (every sparse weight is read
        masked, weight * mask: the baseline the sparse kernels are measured against).
    fuse_loss: fuse an output projection with its cross-entropy loss, chunked over tokens, so the full
        logits never exist (passes/fuse_linear_cross_entropy.py); False computes them as the model does.
    memory_budget: None, or bytes (an int or a size such as "40MB") the compiled training graph may allocate
        above what is resident, as the executor's liveness model counts it: the backward recomputes just enough
        of the forward to fit (memory_budget.py).
    """

    update: UpdateScheme | None = None
    executor: str = "inductor"
    sparsity: object = None
    cost_model: str = "measure"
    fuse_loss: bool = True
    memory_budget: object = None

    def __post_init__(self):
        if self.update is not None and not isinstance(self.update, UpdateScheme):
            raise ConfigError(f"option 'update' must be a sparsecc.UpdateScheme, got {type(self.update).__name__}")
        if self.sparsity is not None and not isinstance(self.sparsity, Sparsity):
            raise ConfigError(f"option 'sparsity' must be a sparsecc.Sparsity, got {type(self.sparsity).__name__}")
        if self.cost_model not in _COST_MODELS:
            raise ConfigError(f"option 'cost_model' must be one of {_COST_MODELS}, got {self.cost_model!r}")
        if not isinstance(self.fuse_loss, bool):
            raise ConfigError(f"option 'fuse_loss' must be True or False, got {self.fuse_loss!r}")
        if self.executor not in _EXECUTORS:
            raise ConfigError(f"option 'executor' must be one of {_EXECUTORS}, got {self.executor!r}.{closest(str(self.executor), _EXECUTORS)}")
        if self.memory_budget is not None:
            parse_budget(self.memory_budget)

    @property
    def budget_bytes(self) -> int | None:
        """memory_budget in bytes (None: no budget)."""
        return None if self.memory_budget is None else parse_budget(self.memory_budget)

    @classmethod
    def from_options(cls, options: Mapping[str, object] | None) -> "Config":
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        for key in options:
            if key not in valid:
                raise ConfigError(f"unknown sparsecc option {key!r}; valid options are {valid}.{closest(str(key), valid)}")
        return cls(**options)

    @property
    def scheme(self) -> UpdateScheme:
        return self.update if self.update is not None else UpdateScheme.full()
