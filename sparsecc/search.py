"""search_scheme: choose which biases, weights and channel ratios to train under a memory budget (Tiny Training's
contribution analysis and evolutionary search).

1. Units. Every 1-D parameter (a bias, a norm's scale) is one unit, trained in full; every weight gives one
   unit per channel ratio: Channels(r) for r < 1 (dim="in", or dim="out" where the weight has one input
   channel) and "full" for r = 1. A scheme trains at most one unit per parameter.
2. Memory of a scheme = optimizer state + the liveness model's peak of the compiled training step
   (TrainStep.report.stats["peak_bytes_estimate"]): the step is exported once and only the passes run per
   scheme, cached. A scheme is first checked against a lower bound (the largest single-unit memory plus the
   others' optimizer state) so that hopeless ones are not compiled.
3. Contribution of a unit = held-out loss decrease after `steps` optimizer steps that train only that unit
   (eager, the reference semantics of ARCHITECTURE.md), minus the decrease of training nothing (BatchNorm
   statistics adapt to the new data either way).
4. Greedy: add units by contribution per byte above the cheapest unit while the scheme fits. Evolutionary:
   a population seeded with the greedy scheme and the hand-written families (bias-only, last-k layers,
   last-k with Channels), crossover and mutation, fitness = summed contribution, constraint = budget.
5. Finalists (the best by fitness, the greedy scheme, every fitting seed) are trained as whole schemes and
   the one with the largest measured held-out loss decrease is returned. Deterministic given `seed`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch.utils._pytree import tree_flatten

from . import memory
from .config import Channels, Rule, UpdateScheme, rule_name
from .errors import ConfigError, human, parse_budget  # noqa: F401 - parse_budget re-exported (sparsecc.search.parse_budget)
from .graph import clone_graph_module
from .optim import AdamW, SGD
from .pipeline import TRAIN_STEP_PASSES, run_passes
from .progress import Bar, silenced
from .calling import call_model
from .train_step import compile_train_step

# ---- budgets --------------------------------------------------------------------------------------------
# KB, MB, GB are powers of 1000 (as the benchmark tables print MB = 10^6 bytes); KiB, MiB, GiB powers of 1024.
# ---- units and hand-written schemes ---------------------------------------------------------------------
def _pattern(name: str) -> str:
    """An fnmatch pattern matching exactly this parameter name."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def weight_rule(p: torch.Tensor, ratio: float) -> Rule:
    """"full" for ratio 1, else Channels(ratio) on the input channels (output ones when there is one input)."""
    return "full" if ratio >= 1 else Channels(ratio, dim="in" if p.shape[1] > 1 else "out")


def units_of(model: torch.nn.Module, ratios) -> list[tuple[str, Rule]]:
    """(parameter, rule) for every unit, in parameter order; ratios giving the same channel count are merged."""
    units = []
    for name, p in model.named_parameters():
        if p.dim() < 2:
            units.append((name, "full"))
            continue
        counts = set()
        for r in sorted(ratios):
            rule = weight_rule(p, r)
            k = rule.count(p.shape[rule.axis]) if isinstance(rule, Channels) else None
            if k is not None and (k in counts or k == p.shape[rule.axis]):
                continue
            counts.add(k)
            units.append((name, rule))
    return units


def _layers(model) -> list[list[tuple[str, torch.Tensor]]]:
    """Parameters grouped by the module owning them, in definition order."""
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        groups.setdefault(name.rpartition(".")[0], []).append((name, p))
    return list(groups.values())


def baseline_schemes(model: torch.nn.Module, ratios=(0.25, 0.5)) -> dict[str, dict[str, Rule]]:
    """The hand-written families: every bias ("bias-only"), the last k layers in full ("last-k"), and the last
    k layers with the weights below the last layer at Channels(r) ("last-k@r"; the last layer, usually the
    classifier, in full). name -> {parameter: rule}, the 1-D parameters of a layer trained with it."""
    out = {"bias-only": {n: "full" for n, _ in model.named_parameters() if n.endswith("bias")}}
    layers = _layers(model)
    for k in range(1, len(layers) + 1):
        out[f"last-{k}"] = {n: "full" for layer in layers[-k:] for n, _ in layer}
        below = [item for layer in layers[-k:-1] for item in layer]
        if any(p.dim() >= 2 for _, p in below):
            for r in ratios:
                out[f"last-{k}@{r:g}"] = {**{n: weight_rule(p, r) if p.dim() >= 2 else "full" for n, p in below},
                                          **{n: "full" for n, _ in layers[-1]}}
    return {k: v for k, v in out.items() if v}


def to_scheme(rules: Mapping[str, Rule]) -> UpdateScheme:
    return UpdateScheme({_pattern(n): r for n, r in rules.items()})


def _key(rules: Mapping[str, Rule]) -> tuple:
    return tuple(sorted((n, repr(r)) for n, r in rules.items()))


# ---- memory ---------------------------------------------------------------------------------------------
class MemoryModel:
    """Training memory of a scheme for one batch shape: optimizer state + the liveness peak of the step graph.
    The step is exported once; each scheme clones the joint graph and runs the training passes on it (the same
    graph compile_train_step builds, so the same estimate)."""

    def __init__(self, model, loss_fn, optimizer, example):
        last = list(dict(model.named_parameters()))[-1]      # any scheme will do: its export is what is kept
        step = compile_train_step(copy.deepcopy(model), loss_fn, optimizer=optimizer, update=to_scheme({last: "full"}),
                                  example_inputs=example, executor="eager")
        self.joint, self.plan = step.joint_graph(*example)
        self.optimizer = optimizer
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.cache: dict[tuple, int] = {}

    def __call__(self, rules: Mapping[str, Rule]) -> int:
        key = _key(rules)
        if key not in self.cache:
            self.cache[key] = self._estimate(rules)
        return self.cache[key]

    def _estimate(self, rules) -> int:
        resolved = to_scheme(rules).resolve(self.params)
        seen, params = set(), []
        for p in self.plan.params:          # tied weights: only a tensor's first name is trained
            tensor = id(self.params[p.name])
            params.append(dataclasses.replace(p, rule="frozen" if tensor in seen else resolved[p.name], indices=None))
            seen.add(tensor)
        graph = clone_graph_module(self.joint)
        run_passes(graph, dataclasses.replace(self.plan, params=tuple(params)), TRAIN_STEP_PASSES)
        return memory.liveness(graph).peak + sum(
            math.prod(shape) * self.params[name].element_size() * len(self.optimizer.state_names)
            for name, shape in graph.meta["sparsecc_updates"])


def measure(model, loss_fn, optimizer, rules, example) -> tuple[int, int]:
    """(estimated, measured) training memory of a real compile_train_step on a copy of model: optimizer state
    plus the step's liveness estimate, and plus the measured peak of one step."""
    step = compile_train_step(copy.deepcopy(model), loss_fn, optimizer=optimizer, update=to_scheme(rules),
                              example_inputs=example, executor="eager")
    state = sum(t.numel() * t.element_size() for s in step.state.values() for t in s.values())
    peak = step.measure_memory(*example)
    return state + step.report.stats["peak_bytes_estimate"], state + peak


# ---- contribution ---------------------------------------------------------------------------------------
def _trained(t: torch.Tensor, rule: Rule) -> torch.Tensor:
    return t.narrow(rule.axis, 0, rule.count(t.shape[rule.axis])) if isinstance(rule, Channels) else t


def train_eagerly(model, loss_fn, optimizer, rules: Mapping[str, Rule], batches, steps: int) -> None:
    """`steps` steps (cycling over batches) that train only `rules`, in place: eager gradients, the first k
    channels of a Channels rule, the optimizer's own update function (the semantics of compile_train_step)."""
    params = dict(model.named_parameters())
    names = list(rules)
    for n in names:
        params[n].requires_grad_(True)
    state = {n: [torch.zeros_like(_trained(params[n], rules[n])) for _ in optimizer.state_names] for n in names}
    lr, count = torch.tensor(float(optimizer.lr)), torch.tensor(0.0)
    for i in range(steps):
        x, y = batches[i % len(batches)]
        grads = torch.autograd.grad(loss_fn(call_model(model, x), y), [params[n] for n in names])
        count += 1
        with torch.no_grad():
            for n, g in zip(names, grads):
                view = _trained(params[n], rules[n])
                new = optimizer.update(view, _trained(g, rules[n]), lr, count, *state[n])
                view.copy_(new[0])
                for s, v in zip(state[n], new[1:]):
                    s.copy_(v)


@torch.no_grad()
def held_out_loss(model, loss_fn, batches) -> float:
    model.eval()
    return sum(float(loss_fn(call_model(model, x), y)) for x, y in batches) / len(batches)


class LossDecrease:
    """Held-out loss decrease from training a scheme for `steps` steps, relative to training nothing (the same
    forward passes, so BatchNorm statistics adapt alike)."""

    def __init__(self, model, loss_fn, optimizer, train, held, steps):
        self.model, self.loss_fn, self.optimizer, self.train, self.held, self.steps = \
            model, loss_fn, optimizer, train, held, steps
        nothing = copy.deepcopy(model)
        with torch.no_grad():
            for i in range(steps):
                call_model(nothing, train[i % len(train)][0])
        self.reference = held_out_loss(nothing, loss_fn, held)

    def __call__(self, rules: Mapping[str, Rule]) -> float:
        trial = copy.deepcopy(self.model)
        train_eagerly(trial, self.loss_fn, self.optimizer, rules, self.train, self.steps)
        return self.reference - held_out_loss(trial, self.loss_fn, self.held)


# ---- the report -----------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One scheme the search looked at."""

    rules: dict[str, Rule]            # trained parameter -> rule
    kind: str                         # "unit", "seed:<name>", "greedy", "evolution"
    memory_bound: int                 # lower bound used to skip compiling hopeless schemes
    memory_estimate: int | None       # optimizer state + liveness peak; None when the bound already exceeded
    contribution: float | None = None     # summed unit contributions (the search's fitness)
    loss_decrease: float | None = None    # measured held-out loss decrease training this whole scheme
    memory_measured: int | None = None    # optimizer state + measured peak of one real step

    def describe(self) -> str:
        return ", ".join(f"{n}: {rule_name(r)}" for n, r in self.rules.items())


@dataclass
class SearchReport:
    """What search_scheme(..., report=True) tried: every candidate with its memory bound, compiled estimate,
    contribution and (for finalists) measured loss decrease; the chosen one also with measured memory."""

    budget: int
    minimum: int                      # memory of the cheapest single unit
    candidates: list[Candidate]       # every scheme tried, in order (units first)
    chosen: Candidate
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def mb(v):
            return "-" if v is None else f"{v / 1e6:.3f}"

        def num(v):
            return "-" if v is None else f"{v:+.4f}"

        units = [c for c in self.candidates if c.kind == "unit"]
        rest = sorted((c for c in self.candidates if c.kind != "unit" and c is not self.chosen
                       and c.memory_estimate is not None and c.memory_estimate <= self.budget),
                      key=lambda c: -(c.contribution or 0))[:10]
        bound_ok = [c for c in self.candidates if c.memory_estimate is not None]
        violations = sum(c.memory_bound > c.memory_estimate for c in bound_ok)
        bound = ("the quick memory bound that skips compiling schemes which cannot fit was never above a compiled "
                 "estimate" if not violations else
                 f"the quick memory bound that skips compiling schemes which cannot fit was above the compiled "
                 f"estimate for {violations} scheme(s), so some schemes that fit may have been skipped")
        lines = [f"scheme search: budget {human(self.budget)}, smallest trainable scheme {human(self.minimum)}, "
                 f"{len(self.candidates)} candidates ({len(bound_ok)} compiled), {self.seconds:.1f} s; {bound}",
                 "memory in MB: bound = quick lower bound, est. = liveness model of the compiled step, meas. = measured; "
                 "contrib. = summed held-out loss decrease of the units; loss dec. = measured for the whole scheme",
                 f"{'kind':14}{'bound MB':>9}{'est. MB':>9}{'meas. MB':>9}{'contrib.':>10}{'loss dec.':>10}  scheme"]
        for c in units + rest + [self.chosen]:
            kind = "CHOSEN" if c is self.chosen else c.kind
            lines.append(f"{kind[:14]:14}{mb(c.memory_bound):>9}{mb(c.memory_estimate):>9}{mb(c.memory_measured):>9}"
                         f"{num(c.contribution):>10}{num(c.loss_decrease):>10}  {c.describe()}")
        return "\n".join(lines + self.notes)


def Progress(enabled: bool) -> Bar:
    """The search's progress bar on stderr (sparsecc.progress: off with progress=False or SPARSECC_PROGRESS=0)."""
    return Bar("sparsecc.search_scheme", enabled)


# ---- the search -----------------------------------------------------------------------------------------
class _Search:
    """The state one search shares: units, their memory and contribution, and every candidate tried."""

    def __init__(self, units, unit_state, memory_of, budget):
        self.units, self.unit_state, self.memory_of, self.budget = units, unit_state, memory_of, budget
        self.slots = list(dict.fromkeys(n for n, _ in units))               # parameters with units
        self.options = {s: [i for i, (n, _) in enumerate(units) if n == s] for s in self.slots}
        self.unit_memory: dict[int, int] = {}
        self.contribution: dict[int, float] = {}
        self.tried: dict[tuple, Candidate] = {}

    def rules(self, genome: tuple) -> dict[str, Rule]:
        return {self.units[u][0]: self.units[u][1] for u in genome if u is not None}

    def fitness(self, genome: tuple) -> float:
        return sum(self.contribution.get(u, -math.inf) for u in genome if u is not None)

    def bound(self, genome: tuple) -> int:
        """A lower bound on a scheme's memory: its most expensive unit alone, plus the others' optimizer state."""
        members = [u for u in genome if u is not None]
        top = max(members, key=self.unit_memory.__getitem__)
        return self.unit_memory[top] + sum(self.unit_state[u] for u in members if u != top)

    def measure_units(self, progress, notes: list[str]) -> int:
        """Each unit's memory alone; returns the smallest (the minimum trainable scheme)."""
        for u, (name, rule) in enumerate(self.units):
            progress("memory of units", u + 1, len(self.units))
            try:
                self.unit_memory[u] = self.memory_of({name: rule})
            except ConfigError as e:
                notes.append(f"unit {name}: {rule_name(rule)} skipped: {e}")
        return min(self.unit_memory.values())

    def score_units(self, decrease, progress) -> None:
        """The contribution of every unit that fits alone; every unit becomes a candidate of the report."""
        fitting = [u for u, m in self.unit_memory.items() if m <= self.budget]
        for i, u in enumerate(fitting):
            progress("contribution of units", i + 1, len(fitting))
            self.contribution[u] = decrease(dict([self.units[u]]))
        for u, m in self.unit_memory.items():
            c = self.contribution.get(u)
            self.tried[_key(dict([self.units[u]]))] = Candidate(dict([self.units[u]]), "unit", m, m, c, c)

    def fits(self, genome: tuple, kind: str) -> bool:
        if all(u is None for u in genome):
            return False
        rules = self.rules(genome)
        key = _key(rules)
        if key not in self.tried:
            bound = self.bound(genome)
            estimate = self.memory_of(rules) if bound <= self.budget else None
            self.tried[key] = Candidate(rules, kind, bound, estimate, contribution=self.fitness(genome))
        estimate = self.tried[key].memory_estimate
        return estimate is not None and estimate <= self.budget

    def genome(self, rules: Mapping[str, Rule]) -> tuple | None:
        """The genome of a rules dict, or None when a rule is no unit of this search."""
        index = {(n, repr(r)): i for i, (n, r) in enumerate(self.units)}
        picks = {n: index.get((n, repr(r))) for n, r in rules.items()}
        if any(v is None for v in picks.values()):
            return None
        return tuple(picks.get(s) for s in self.slots)

    def greedy(self, progress) -> tuple:
        m_min = min(self.unit_memory.values())
        useful = [u for u, c in self.contribution.items() if c > 0]
        useful.sort(key=lambda u: -self.contribution[u] / max(self.unit_memory[u] - m_min, 1))
        chosen = dict.fromkeys(self.slots)
        for i, u in enumerate(useful):
            progress("greedy", i + 1, len(useful))
            slot = self.units[u][0]
            if chosen[slot] is not None and self.contribution[chosen[slot]] >= self.contribution[u]:
                continue
            trial = {**chosen, slot: u}
            if self.fits(tuple(trial.values()), "greedy"):
                chosen = trial
        if all(u is None for u in chosen.values()):      # nothing useful fits: the best unit that does
            best = max(self.contribution, key=self.contribution.get)
            chosen[self.units[best][0]] = best
        return tuple(chosen.values())

    def choose(self, finalists: list[tuple], decrease, progress) -> Candidate:
        """Train each finalist as a whole scheme; the largest held-out loss decrease wins (the first on a tie)."""
        finalists = list(dict.fromkeys(finalists))
        for i, genome in enumerate(finalists):
            progress("finalists", i + 1, len(finalists))
            self.tried[_key(self.rules(genome))].loss_decrease = decrease(self.rules(genome))
        return max((self.tried[_key(self.rules(g))] for g in finalists), key=lambda c: c.loss_decrease)

    def mutate(self, genome: tuple, rng: random.Random) -> tuple:
        genome = list(genome)
        for _ in range(1 + (rng.random() < 0.5)):
            i = rng.randrange(len(self.slots))
            genome[i] = rng.choice([None] + [u for u in self.options[self.slots[i]] if u in self.contribution])
        return tuple(genome)

    def evolve(self, seeds: list[tuple], rng, population: int, generations: int, progress) -> list[tuple]:
        pool = list(dict.fromkeys(seeds))
        for _ in range(20 * population):
            if len(pool) >= population:
                break
            child = self.mutate(rng.choice(seeds), rng)
            if child not in pool and self.fits(child, "evolution"):
                pool.append(child)
        for gen in range(generations):
            progress("evolution", gen + 1, generations)
            parents = sorted(pool, key=self.fitness, reverse=True)[:max(2, population // 2)]
            pool = list(parents)
            for _ in range(20 * population):
                if len(pool) >= population or len(parents) < 2:
                    break
                a, b = rng.sample(parents, 2)
                child = self.mutate(tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b)), rng)
                if child not in pool and self.fits(child, "evolution"):
                    pool.append(child)
        return sorted(pool, key=self.fitness, reverse=True)


def _check_args(batches, optimizer, ratios, steps, population, generations, finalists):
    if not isinstance(optimizer, (SGD, AdamW)):
        raise ConfigError(f"optimizer must be sparsecc.SGD or sparsecc.AdamW, got {type(optimizer).__name__}")
    if not (isinstance(batches, (list, tuple)) and len(batches) >= 2
            and all(isinstance(b, (list, tuple)) and len(b) == 2 for b in batches)):
        raise ConfigError("batches must be a list of at least 2 (x, y) pairs: the last quarter is held out to "
                          "measure contributions")
    if not ratios or any(not (isinstance(r, (int, float)) and 0 < r <= 1) for r in ratios):
        raise ConfigError(f"ratios must be channel fractions in (0, 1], got {ratios!r}")
    for name, value in (("steps", steps), ("population", population), ("generations", generations),
                        ("finalists", finalists)):
        low = 0 if name == "generations" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"search_scheme {name} must be an int >= {low}, got {value!r}")


def search_scheme(model, loss_fn, batches, memory_budget, *, optimizer, ratios=(0.25, 0.5, 1.0), steps=30,
                  population=12, generations=6, finalists=3, seed=0, progress=True, report=False):
    """The UpdateScheme with the largest held-out loss decrease whose training step fits memory_budget.

    batches: (x, y) pairs; the last quarter is held out, the rest is trained on, and memory is estimated for
    the shape of batches[0] (train with that batch size). memory_budget: bytes, or "256KB", "2MB" (powers of
    1000), "1.5MiB" (powers of 1024); training memory = optimizer state + peak of everything a step allocates
    (weights excluded), as compile_train_step's liveness model estimates it. A budget below the cheapest
    single unit raises ConfigError stating that minimum. Training runs in the mode the model is in, as in
    compile_train_step (call model.train() first for BatchNorm to use batch statistics). The model is not modified.
    With report=True returns (scheme, SearchReport)."""
    start = time.perf_counter()
    budget = parse_budget(memory_budget)
    _check_args(batches, optimizer, ratios, steps, population, generations, finalists)
    held_n = max(1, len(batches) // 4)
    train, held = list(batches[:-held_n]), list(batches[-held_n:])
    example = tuple(batches[0])
    notes = [] if model.training else ["the model is in eval mode: BatchNorm layers use running statistics in the "
                                       "steps searched (call model.train() first to search for training mode)"]
    units = units_of(model, ratios)
    params = dict(model.named_parameters())
    unit_state = [_trained(params[n], r).numel() * params[n].element_size() * len(optimizer.state_names)
                  for n, r in units]
    bar = Progress(progress)
    quiet = silenced(not progress)      # progress=False: nothing inside (compiles, measurements) reports either
    quiet.__enter__()
    try:
        search = _Search(units, unit_state, MemoryModel(model, loss_fn, optimizer, example), budget)
        minimum = search.measure_units(bar, notes)
        if budget < minimum:
            name, rule = units[min(search.unit_memory, key=search.unit_memory.get)]
            raise ConfigError(f"memory_budget {memory_budget!r} ({budget:,} bytes) is below the minimum trainable "
                              f"scheme: training only {name!r} ({rule_name(rule)}) needs {minimum:,} bytes "
                              f"({human(minimum)}) for batches of shape {tuple(tree_flatten(example[0])[0][0].shape)}")
        decrease = LossDecrease(model, loss_fn, optimizer, train, held, steps)
        search.score_units(decrease, bar)
        greedy = search.greedy(bar)
        seeds = [g for name, rules in baseline_schemes(model, [r for r in ratios if r < 1]).items()
                 if (g := search.genome(rules)) is not None and search.fits(g, f"seed:{name}")]
        ranked = search.evolve([greedy, *seeds], random.Random(seed), population, generations, bar)
        chosen = search.choose([*ranked[:finalists], greedy, *seeds], decrease, bar)
        bar("measuring the chosen scheme", 0, 1)
        estimate, chosen.memory_measured = measure(model, loss_fn, optimizer, chosen.rules, example)
        if estimate != chosen.memory_estimate:
            notes.append(f"compile_train_step estimates the chosen scheme at {estimate:,} bytes, the search at "
                         f"{chosen.memory_estimate:,}")
            chosen.memory_estimate = estimate
        bar("measuring the chosen scheme", 1, 1)
    finally:
        bar.close()
        quiet.__exit__(None, None, None)
    scheme = to_scheme(chosen.rules)
    if not report:
        return scheme
    seconds = time.perf_counter() - start
    return scheme, SearchReport(budget, minimum, list(search.tried.values()), chosen, seconds, notes)
