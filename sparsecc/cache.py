"""Where sparsecc keeps what it builds and measures (C++ kernels, Triton sources and tunings, cost-model timings,
the aarch64 IREE runtime): $SPARSECC_CACHE_DIR, or ~/.cache/sparsecc when it is unset or empty."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSECC_CACHE_DIR") or Path.home() / ".cache" / "sparsecc")
