"""search_scheme: budgets, the minimum-budget error, fit under the memory model, determinism, and on a real task
(scikit-learn's digits) a searched scheme at least as accurate as the best hand-written scheme that fits."""
import copy
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from models import MLP
from sparsecc.search import MemoryModel, baseline_schemes, parse_budget, to_scheme

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_digits_budget as digits  # noqa: E402

SGD = sparsecc.SGD(lr=0.05)


def mlp_task():
    torch.manual_seed(0)
    model = MLP()
    w = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    xs = [torch.randn(16, 12, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    return model, [(x, x @ w) for x in xs]


def search(model, batches, budget, **kw):
    return sparsecc.search_scheme(model, F.mse_loss, batches, budget, optimizer=SGD, population=6, generations=3,
                                  steps=5, progress=False, report=True, **kw)


def trained_memory(model, loss_fn, scheme, example, optimizer=SGD):
    """optimizer state + liveness peak of compile_train_step: the memory model the search must respect."""
    step = sparsecc.compile_train_step(copy.deepcopy(model), loss_fn, optimizer=optimizer, update=scheme,
                                       example_inputs=example, executor="eager")
    state = sum(t.numel() * t.element_size() for s in step.state.values() for t in s.values())
    return state + step.report.stats["peak_bytes_estimate"]


@pytest.mark.parametrize("text,expected", [(4096, 4096), ("256KB", 256_000), ("2MB", 2_000_000), ("2 mb", 2_000_000),
                                           ("1.5MiB", 1_572_864), ("64KiB", 65_536), ("100", 100), ("3B", 3),
                                           (1.5e6, 1_500_000), ("0.5GB", 500_000_000)])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["2 parsecs", "MB", "1..5MB", "-1MB", "0KB", 0, -5, True, None, "1e6"])
def test_bad_budget_names_the_input(bad):
    with pytest.raises(sparsecc.ConfigError, match=re.escape(repr(bad))):
        parse_budget(bad)


def test_budget_below_minimum_states_it_and_the_minimum_is_trainable():
    model, batches = mlp_task()
    with pytest.raises(sparsecc.ConfigError, match=r"minimum trainable scheme.* needs [\d,]+ bytes \(\d") as err:
        search(model, batches, "100B")
    minimum = int(re.search(r"needs ([\d,]+) bytes", str(err.value)).group(1).replace(",", ""))
    scheme, report = search(model, batches, minimum)
    assert report.minimum == minimum
    assert trained_memory(model, F.mse_loss, scheme, batches[0]) <= minimum


def test_deterministic_fits_and_leaves_the_model_alone(capsys):
    model, batches = mlp_task()
    before = copy.deepcopy(model.state_dict())
    memory = MemoryModel(model, F.mse_loss, SGD, batches[0])
    budget = (memory({"fc3.bias": "full"}) + memory({"fc1.bias": "full"})) // 2
    a, report_a = search(model, batches, budget, seed=3)
    b, report_b = search(model, batches, budget, seed=3)
    assert a == b and [c.rules for c in report_a.candidates] == [c.rules for c in report_b.candidates]
    assert capsys.readouterr().err == ""
    assert report_a.chosen.memory_estimate <= budget
    assert trained_memory(model, F.mse_loss, a, batches[0]) == report_a.chosen.memory_estimate
    # against a measurement (the profiler's peak of one real step), not only against the model itself; the
    # eager executor allocates what the liveness model counts (tests/test_memory_passes.py counts it by hand)
    assert abs(report_a.chosen.memory_measured - report_a.chosen.memory_estimate) <= 0.05 * report_a.chosen.memory_measured
    compiled = [c for c in report_a.candidates if c.memory_estimate is not None]
    assert all(c.memory_bound <= c.memory_estimate for c in compiled)       # the pruning bound is a lower bound
    assert {c.kind for c in report_a.candidates} >= {"unit", "greedy"}
    assert "CHOSEN" in str(report_a)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    sparsecc.search_scheme(model, F.mse_loss, batches, budget, optimizer=SGD, population=2, generations=0, steps=1)
    assert "sparsecc.search_scheme" in capsys.readouterr().err                 # the progress bar


@pytest.mark.slow      # ~11 s: four schemes compiled both ways
def test_memory_model_equals_compile_train_step_estimate():
    model = digits.convnet()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,))
    optimizer = sparsecc.SGD(lr=0.05, momentum=0.9)
    memory = MemoryModel(model, F.cross_entropy, optimizer, (x, y))
    for rules in [{"11.bias": "full"}, {"7.bias": "full", "6.weight": sparsecc.Channels(0.25)},
                  baseline_schemes(model)["bias-only"], baseline_schemes(model)["last-4@0.5"]]:
        assert memory(rules) == trained_memory(model, F.cross_entropy, to_scheme(rules), (x, y), optimizer), rules


@pytest.mark.slow      # minutes: a whole search plus 100 fine-tuning steps per fitting baseline
def test_digits_searched_scheme_at_least_as_accurate_as_the_best_fitting_baseline():
    old, train, test = digits.digits_task()
    model = digits.pretrain(old)
    optimizer = sparsecc.SGD(lr=0.05, momentum=0.9)
    batches = digits.batches(train, 12, seed=2)
    budget = parse_budget("1MB")
    scheme, report = sparsecc.search_scheme(model, F.cross_entropy, batches, budget, optimizer=optimizer,
                                            population=8, generations=4, progress=False, report=True)
    assert trained_memory(model, F.cross_entropy, scheme, batches[0], optimizer) <= budget

    def accuracy(s):
        tuned = copy.deepcopy(model)
        digits.finetune(tuned, s, train, 100, optimizer)
        return digits.accuracy(tuned, test)

    memory = MemoryModel(model, F.cross_entropy, optimizer, batches[0])
    fitting = {name: rules for name, rules in baseline_schemes(model).items() if memory(rules) <= budget}
    assert "last-4" in fitting and not {"bias-only", "last-5"} & set(fitting)      # the budget binds
    baseline = {name: accuracy(to_scheme(rules)) for name, rules in fitting.items()}
    best = max(baseline, key=baseline.get)
    searched = accuracy(scheme)
    assert searched >= baseline[best], (scheme.describe(), searched, baseline)
    assert searched > digits.accuracy(model, test) + 0.5      # a new classifier starts near chance (0.2)
