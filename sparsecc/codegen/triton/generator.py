"""Turns a template's Source into a runnable kernel: the text is written to $SPARSECC_CACHE_DIR (default
~/.cache/sparsecc)/triton/<hash>.py (Triton's @jit reads the source of a real file) and imported.

Every kernel generated in this process is kept by name: generated_sources() gives their text (for the compiler's
report and SPARSECC_DEBUG_DIR dumps), generated_kernels() the Kernel objects (for aot_compile). Under
TRITON_INTERPRET=1 @triton.jit yields the interpreter's function; the variable must be set before triton is
imported (see imported_for_interpreter).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.language.standard
from triton.runtime.jit import JITFunction

from ...cache import cache_dir
from .templates import Source


@dataclass(frozen=True)
class Kernel:
    source: Source
    path: Path
    fn: object           # the @triton.jit function (an InterpretedFunction under TRITON_INTERPRET=1)

    @property
    def name(self) -> str:
        return self.source.name

    def jit_function(self) -> JITFunction:
        """The compilable function, also when `fn` is the interpreter's (whose .fn is the plain function)."""
        return self.fn if isinstance(self.fn, JITFunction) else JITFunction(self.fn.fn)


_LOADED: dict[str, Kernel] = {}   # source hash -> kernel
_BY_NAME: dict[str, Kernel] = {}


def imported_for_interpreter() -> bool:
    """Whether triton was imported under TRITON_INTERPRET=1, which turns Triton's own library functions (tl.sum
    and the like) into interpreter functions: such a process interprets kernels and cannot compile for a GPU."""
    return not isinstance(triton.language.standard.sum, JITFunction)


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (checking that TRITON_INTERPRET did not change since import)."""
    imported = imported_for_interpreter()
    if imported != bool(triton.knobs.runtime.interpret):
        raise RuntimeError(f"TRITON_INTERPRET was {'set' if imported else 'unset'} when triton was imported and "
                           "has changed since: set it before triton is first imported")
    return imported


def _cache_dir() -> Path:
    return cache_dir() / "triton"


def _write(text: str, digest: str) -> Path:
    """The source file of a kernel, written atomically (a temporary file renamed) unless it already exists."""
    path = _cache_dir() / f"{digest}.py"
    if path.exists() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{digest}-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def generate(source: Source) -> Kernel:
    """The kernel of a template's output, written and imported on first use."""
    digest = hashlib.sha256(source.text.encode()).hexdigest()[:20]
    if digest not in _LOADED:
        path = _write(source.text, digest)
        module_name = f"sparsecc_triton_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _LOADED[digest] = Kernel(source, path, getattr(module, source.name))
        if os.environ.get("SPARSECC_DEBUG_DIR"):     # kernels are generated when first run, after the report
            dump_sources(os.environ["SPARSECC_DEBUG_DIR"], {source.name: source.text})
    _BY_NAME[source.name] = _LOADED[digest]
    return _LOADED[digest]


def generated_kernels() -> dict[str, Kernel]:
    """Every kernel generated in this process, by name."""
    return dict(_BY_NAME)


def generated_sources() -> dict[str, str]:
    """The Triton source of every kernel generated in this process, by name."""
    return {name: k.source.text for name, k in _BY_NAME.items()}


def dump_sources(directory: str | os.PathLike, sources: dict[str, str] | None = None) -> list[Path]:
    """Write each generated kernel's source (or those given) to directory/triton/<name>.py."""
    out = Path(directory) / "triton"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (generated_sources() if sources is None else sources).items():
        paths.append(out / f"{name}.py")
        paths[-1].write_text(text)
    return paths
