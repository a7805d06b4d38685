"""Errors users see, and the small formatters their messages share."""
from __future__ import annotations

import difflib


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
