"""CPU targets through IREE: torch.export program → torch-mlir (linalg on tensors) → iree-compile for llvm-cpu
with the target's triple → .vmfb; and running a .vmfb, in process (iree.runtime, when the target is this
machine's architecture) or with a given `iree-run-module` binary, under qemu-user when the target is another
architecture. Programs are pure dense linalg: sparse weights arrive as plain value/index tensors.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..cost_model import cache_dir

TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "riscv64": "riscv64-linux-gnu"}
_FEATURES = {"aarch64": "+neon", "riscv64": "+m,+a,+f,+d,+c"}


def _missing(what: str, package: str) -> ConfigError:
    return ConfigError(f"{what} needs {package}; install it with "
                       f"`pip install -c constraints.txt -e \".[deploy]\"` (see README, Deploying)")


def _empty_permuted(size, physical_layout, *, dtype=None, layout=None, device=None, pin_memory=None):
    """torch-mlir has no lowering for aten.empty_permuted (core ATen's empty_like): tensors have value semantics
    in linalg, so the physical layout is immaterial and a plain empty tensor of the logical size is the same."""
    return torch.empty(size, dtype=dtype, device=device)


def to_mlir(exported: torch.export.ExportedProgram, name: str) -> str:
    """The program as MLIR in the linalg-on-tensors dialects, function `name`."""
    try:
        from torch_mlir import fx
        from torch_mlir.extras.fx_decomp_util import get_decomposition_table
    except ImportError:
        raise _missing("lowering to IREE", "torch-mlir") from None
    table = {**get_decomposition_table(), torch.ops.aten.empty_permuted.default: _empty_permuted}
    return str(fx.export_and_import(exported, output_type="linalg-on-tensors", func_name=name,
                                    decomposition_table=table))


def compile_vmfb(mlir: str, target: str) -> bytes:
    """An IREE module for a generic CPU of `target` (portable across that architecture's machines)."""
    try:
        import iree.compiler as ireec
    except ImportError:
        raise _missing("compiling for a CPU target", "iree-base-compiler") from None
    args = [f"--iree-llvmcpu-target-triple={TRIPLES[target]}", "--iree-llvmcpu-target-cpu=generic"]
    if target in _FEATURES:
        args.append(f"--iree-llvmcpu-target-cpu-features={_FEATURES[target]}")
    return ireec.compile_str(mlir, target_backends=["llvm-cpu"], extra_args=args)


_WHEEL_PLATFORMS = {"x86_64": "manylinux_2_28_x86_64", "aarch64": "manylinux_2_28_aarch64"}
_TOOL = "iree/_runtime_libs/iree-run-module"


def fetch_iree_run_module(target: str) -> Path:
    """The `iree-run-module` binary for target's architecture, taken from the iree-base-runtime wheel of the
    installed version (downloaded once with pip into $SPARSECC_CACHE_DIR). Run it under qemu-user on
    another architecture (CommandLine does)."""
    from importlib.metadata import PackageNotFoundError, version
    if target not in _WHEEL_PLATFORMS:
        raise ConfigError(f"no iree-base-runtime wheel for {target!r}; have {sorted(_WHEEL_PLATFORMS)}")
    try:
        ver = version("iree-base-runtime")
    except PackageNotFoundError:
        raise _missing("fetching an IREE runtime", "iree-base-runtime") from None
    dest = cache_dir() / f"iree-base-runtime-{ver}-{target}" / "iree-run-module"
    if dest.is_file():
        return dest
    print(f"[sparsecc] downloading iree-base-runtime {ver} for {target} (once, into {dest.parent})",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="sparsecc-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--platform", _WHEEL_PLATFORMS[target], "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
               f"iree-base-runtime=={ver}", "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode or not wheels:
            raise RuntimeError(f"pip could not download iree-base-runtime {ver} for {target}: {run.stderr.strip()[-400:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(_TOOL)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    part.write_bytes(data)
    part.chmod(0o755)
    part.replace(dest)
    return dest


class InProcess:
    """Runs a function of a .vmfb with the iree.runtime Python package on this machine."""

    def __init__(self, vmfb: bytes, function: str):
        try:
            import iree.runtime as ireert
        except ImportError:
            raise _missing("running an IREE module", "iree-base-runtime") from None
        ctx = ireert.SystemContext(config=ireert.Config("local-task"))
        ctx.add_vm_module(ireert.VmModule.copy_buffer(ctx.instance, vmfb))
        self._fn = ctx.modules.module[function]

    def __call__(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self._fn(*[a.detach().cpu().numpy() for a in args])
        out = out if isinstance(out, (list, tuple)) else [out]
        return [torch.from_numpy(np.array(o.to_host())) for o in out]


class CommandLine:
    """Runs a function of a .vmfb with an `iree-run-module` binary, through qemu-<arch> when the binary is for
    another architecture. Inputs and outputs travel as .npy files."""

    def __init__(self, vmfb: bytes, function: str, n_outputs: int, target: str, tool: str):
        if not Path(tool).is_file():
            raise ConfigError(f"iree-run-module binary {tool!r} does not exist")
        self.prefix = []
        if target != platform.machine():
            qemu = shutil.which(f"qemu-{target}")
            if qemu is None:
                raise ConfigError(f"running a {target} module on {platform.machine()} needs qemu-{target} "
                                  f"(Debian: apt-get install qemu-user)")
            sysroot = Path("/usr") / TRIPLES[target]      # Debian's libc6-<arch>-cross for a dynamic binary
            self.prefix = [qemu, "-L", str(sysroot)] if sysroot.is_dir() else [qemu]
        self.vmfb, self.function, self.n_outputs, self.tool = vmfb, function, n_outputs, tool

    def __call__(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        with tempfile.TemporaryDirectory(prefix="sparsecc-iree-") as tmp:
            tmp = Path(tmp)
            (tmp / "module.vmfb").write_bytes(self.vmfb)
            cmd = [*self.prefix, self.tool, f"--module={tmp / 'module.vmfb'}", "--device=local-task",
                   f"--function={self.function}"]
            for i, a in enumerate(args):
                np.save(tmp / f"in{i}.npy", a.detach().cpu().numpy())
                cmd.append(f"--input=@{tmp / f'in{i}.npy'}")
            out = tmp / "out.npy"       # the first output creates it, each further one appends an array
            cmd += [f"--output=@{out}"] + [f"--output=+{out}"] * (self.n_outputs - 1)
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"iree-run-module failed ({run.returncode}): {run.stderr.strip()[-800:]}")
            with open(out, "rb") as f:
                return [torch.from_numpy(np.load(f, allow_pickle=False)) for _ in range(self.n_outputs)]
