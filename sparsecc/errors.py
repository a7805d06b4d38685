"""Errors users see, and the small formatters their messages share."""
from __future__ import annotations

import difflib
import math
import re


class ConfigError(ValueError):
    """A malformed scheme or option. Raised before anything is compiled or modified."""


def closest(word: str, candidates, n: int = 3) -> str:
    """' Did you mean: a, b?' for the candidates closest to word, or '' when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.4)
    return f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""


def human(n: int) -> str:
    """A byte count for people: B, KB, MB, GB (powers of 1000)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _children(names: list[list[str]], prefix: list[str]) -> list[str]:
    return list(dict.fromkeys(n[len(prefix)] for n in names if n[:len(prefix)] == prefix and len(n) > len(prefix)))


def module_prefixes(names) -> list[str]:
    """Where parameters live, coarsely: module paths such as ['blocks.0', 'blocks.1', '...', 'blocks.5', 'head']
    for a model whose parameters are blocks.0.* to blocks.5.*, head.weight, head.bias. A ModuleList is listed
    per item (long runs shortened with '...'); a wrapper module holding most parameters (transformers'
    `model.`) is looked into."""
    split = [n.split(".") for n in names]
    groups = [[c] for c in dict.fromkeys(n[0] for n in split)]
    changed = True
    while changed and len(groups) < 200:
        changed, out = False, []
        for g in groups:
            kids = _children(split, g)
            under = sum(1 for n in split if n[:len(g)] == g)
            numbered = bool(kids) and all(k.isdigit() for k in kids)
            if kids and (numbered or (len(kids) > 1 and 5 * under > 4 * len(split))):
                out += [g + [k] for k in kids]
                changed = True
            else:
                out.append(g)
        groups = out
    labels, i = [], 0
    while i < len(groups):                       # blocks.0, blocks.1, ..., blocks.11
        j = i
        while j + 1 < len(groups) and groups[j + 1][:-1] == groups[i][:-1] and groups[j + 1][-1].isdigit() \
                and groups[i][-1].isdigit():
            j += 1
        run = [".".join(g) for g in groups[i:j + 1]]
        labels += run if len(run) <= 4 else run[:2] + ["..."] + run[-1:]
        i = j + 1
    return labels


def where_parameters_live(names) -> str:
    """' Parameters live under: blocks.0, blocks.1, ..., head.' for a 'matches no parameter' error."""
    labels = module_prefixes(list(names))
    return f" Parameters live under: {', '.join(labels)}." if labels else " The model has no parameters."


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_budget(budget) -> int:
    """Bytes from an int, or a string such as "256KB", "2MB", "1.5MiB" (unit letters in any case)."""
    if isinstance(budget, str):
        m = _SIZE.fullmatch(budget)
        if m is None or m.group(2).upper() not in _SIZE_UNITS:
            hint = closest(m.group(2), ["B", "KB", "MB", "GB", "KiB", "MiB", "GiB"]) if m else ""
            raise ConfigError(f"memory_budget {budget!r} is not a size: give bytes, or a number with B, KB, MB, GB "
                              f"(powers of 1000) or KiB, MiB, GiB (powers of 1024), e.g. '256KB' or '1.5MiB'.{hint}")
        value = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    elif isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = budget
    else:
        raise ConfigError(f"memory_budget must be bytes (an int) or a string such as '2MB', got {budget!r}")
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"memory_budget must be at least 1 byte, got {budget!r}")
    return int(value)
