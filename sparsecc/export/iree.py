"""CPU targets through IREE: torch.export program → torch-mlir (linalg on tensors) → iree-compile for llvm-cpu
with the target's triple and CPU → .vmfb; and running a .vmfb, in process (iree.runtime, when the target is this
machine's architecture) or with a given `iree-run-module` binary, under qemu-user when the target is another
architecture. Programs are pure dense linalg: sparse weights arrive as plain value/index tensors.

A target is an architecture ("x86_64": a generic CPU, portable to every machine of it) or "arch:cpu", a module
tuned for one CPU ("x86_64:x86-64-v3", "aarch64:cortex-a76", "x86_64:host": the CPU of the machine that saves).
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

from ..cache import cache_dir
from ..errors import ConfigError, closest
from .programs import leafspec_warning_ignored

TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "riscv64": "riscv64-linux-gnu"}
_FEATURES = {"aarch64": "+neon", "riscv64": "+m,+a,+f,+d,+c"}     # of the generic CPUs
HOST = "host"

_X86_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
_X86_V3 = (*_X86_V2, "abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
_ARM_V8 = ("fp", "asimd")
_ARM_V82 = (*_ARM_V8, "atomics", "asimdhp", "asimddp", "asimdrdm", "fphp", "lrcpc")
_RV64GC = ("i", "m", "a", "f", "d", "c")
# The CPUs a module can be tuned for (LLVM's names), each with the /proc/cpuinfo flags a machine needs to run
# it: the instruction-set extensions LLVM's code for that CPU may use (x86: `flags`; arm64: `Features`, crypto
# and CRC left out as LLVM never generates them from linalg; riscv64: the extensions of `isa`). LLVM derives
# the features from the name: cortex-a76 is +neon,+dotprod,+fullfp16,+rcpc,+lse,+rdm,+crc,+aes,+sha2,+ssbs.
CPUS = {
    "x86_64": {"x86-64-v2": _X86_V2, "x86-64-v3": _X86_V3,
               "x86-64-v4": (*_X86_V3, "avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")},
    "aarch64": {"cortex-a53": _ARM_V8, "cortex-a55": _ARM_V82, "cortex-a72": _ARM_V8, "cortex-a76": _ARM_V82,
                "neoverse-n1": _ARM_V82},
    "riscv64": {"sifive-u74": _RV64GC, "spacemit-x60": (*_RV64GC, "v", "zba", "zbb", "zbs")},
}
# prefixes of further vector extensions an "arch:host" module may use when this machine has them
_HOST_EXTENSIONS = {"x86_64": ("avx", "amx"), "aarch64": ("sve", "sme", "i8mm", "bf16"), "riscv64": ("v", "zv")}


def split(target: str) -> tuple[str, str]:
    """(architecture, CPU) of a target name: "x86_64" → ("x86_64", "generic"); "x86_64:x86-64-v3" →
    ("x86_64", "x86-64-v3"). ConfigError for an unknown architecture or CPU, listing the known names and
    suggesting the closest."""
    arch, sep, cpu = str(target).partition(":")
    if arch == HOST and sep:
        raise ConfigError(f"unknown target {target!r}: 'host' (torch.export programs) takes no CPU; a module tuned "
                          f"for this machine's CPU is '{platform.machine()}:host'")
    if arch not in TRIPLES:
        raise ConfigError(f"unknown target {target!r}: {arch!r} is not a CPU architecture; known: "
                          f"{', '.join(TRIPLES)}, each optionally ':CPU' (e.g. 'aarch64:cortex-a76'), or 'host' "
                          f"(torch.export programs).{closest(arch, ['host', *TRIPLES])}")
    if not sep:
        return arch, "generic"
    if cpu != HOST and cpu not in CPUS[arch]:
        raise ConfigError(f"unknown target {target!r}: no CPU {cpu!r} for {arch}; known: {', '.join(CPUS[arch])}, "
                          f"or 'host' (the CPU of the machine that saves), or plain {arch!r} for a generic "
                          f"{arch} CPU.{closest(cpu, [*CPUS[arch], HOST])}")
    return arch, cpu


def _cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo text: x86 `flags`, arm64 `Features`, riscv64 the single-letter
    and named extensions of `isa` (rv64imafdcv_zba_zbb → i, m, a, f, d, c, v, zba, zbb)."""
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("flags", "Features"):
            return set(value.split())
        if key == "isa":
            base, *named = value.split("_")
            return {*base[4:], *named}
    return set()


def _machine_flags() -> set[str] | None:
    """This machine's CPU flags from /proc/cpuinfo, or None where there is none (not Linux)."""
    try:
        return _cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def required_flags(target: str) -> list[str]:
    """The /proc/cpuinfo flags a machine needs to run target's module (none for a generic CPU). For "arch:host",
    those of this machine's flags that are vector or listed extensions of its architecture."""
    arch, cpu = split(target)
    if cpu != HOST:
        return sorted(CPUS[arch].get(cpu, ()))
    known = set().union(*CPUS[arch].values())
    return sorted(f for f in _machine_flags() or () if f in known or f.startswith(_HOST_EXTENSIONS[arch]))


def check_cpu(target: str, required: list[str]) -> None:
    """Refuse a module tuned for CPU features this machine lacks before running it dies of SIGILL. Checked
    where the module would run natively (target's architecture is this machine's) on Linux: every flag in
    `required` (recorded at save time) must be in /proc/cpuinfo. Not checked elsewhere: under qemu-user the
    emulated CPU model decides (CommandLine picks one with the features), and without /proc/cpuinfo nothing
    can be read."""
    arch = split(target)[0]
    have = _machine_flags() if arch == platform.machine() else None
    missing = sorted(set(required) - have) if have is not None else []
    if missing:
        raise ConfigError(f"the {target} module needs CPU features this machine lacks (not in /proc/cpuinfo: "
                          f"{', '.join(missing)}) and would crash with SIGILL; load the generic {arch!r} target "
                          f"or re-save for a CPU this machine has, e.g. '{arch}:host'")


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
    with leafspec_warning_ignored():       # export_and_import runs run_decompositions itself
        return str(fx.export_and_import(exported, output_type="linalg-on-tensors", func_name=name,
                                        decomposition_table=table))


def compile_vmfb(mlir: str, target: str) -> bytes:
    """An IREE module for target: a generic CPU of its architecture (portable across that architecture's
    machines) or the named CPU, whose features LLVM derives from the name ("host": this machine's)."""
    try:
        import iree.compiler as ireec
    except ImportError:
        raise _missing("compiling for a CPU target", "iree-base-compiler") from None
    arch, cpu = split(target)
    # lr and step are float64 inputs (as in torch.optim): keep them so, instead of IREE's default demotion to f32
    args = [f"--iree-llvmcpu-target-triple={TRIPLES[arch]}", f"--iree-llvmcpu-target-cpu={cpu}",
            "--iree-input-demote-f64-to-f32=false"]
    if cpu == "generic" and arch in _FEATURES:
        args.append(f"--iree-llvmcpu-target-cpu-features={_FEATURES[arch]}")
    return ireec.compile_str(mlir, target_backends=["llvm-cpu"], extra_args=args)


_WHEEL_PLATFORMS = {"x86_64": "manylinux_2_28_x86_64", "aarch64": "manylinux_2_28_aarch64"}
_TOOL = "iree/_runtime_libs/iree-run-module"


def fetch_iree_run_module(target: str) -> Path:
    """The `iree-run-module` binary for target's architecture ("aarch64" or "aarch64:cortex-a76" alike), taken
    from the iree-base-runtime wheel of the installed version (downloaded once with pip into
    $SPARSECC_CACHE_DIR). Run it under qemu-user on another architecture (CommandLine does)."""
    from importlib.metadata import PackageNotFoundError, version
    target = target.partition(":")[0]
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
    """Runs a function of a .vmfb with the iree.runtime Python package on this machine: its local-task driver
    runs one worker thread per physical core (2 on a 2-core machine; /proc/self/task shows iree-worker-0, -1)."""

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


def _qemu_cpu(qemu: str, cpu: str) -> list[str]:
    """qemu's -cpu option for a module tuned for cpu: qemu's model of that core when it has one (qemu 7.2 has
    cortex-a53, -a57, -a72, -a76, neoverse-n1), so an instruction the core lacks fails as it would on the
    core; else `max` (every feature qemu emulates); else qemu's default."""
    models = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True).stdout.split()
    model = cpu if cpu in models else "max" if "max" in models else None
    return ["-cpu", model] if model else []


class CommandLine:
    """Runs a function of a .vmfb with an `iree-run-module` binary, through qemu-<arch> when the binary is for
    another architecture (with the CPU model _qemu_cpu picks). Inputs and outputs travel as .npy files."""

    def __init__(self, vmfb: bytes, function: str, n_outputs: int, target: str, tool: str):
        if not Path(tool).is_file():
            raise ConfigError(f"iree-run-module binary {tool!r} does not exist")
        self.prefix = []
        arch, cpu = split(target)
        if arch != platform.machine():
            qemu = shutil.which(f"qemu-{arch}")
            if qemu is None:
                raise ConfigError(f"running a {arch} module on {platform.machine()} needs qemu-{arch} "
                                  f"(Debian: apt-get install qemu-user)")
            sysroot = Path("/usr") / TRIPLES[arch]        # Debian's libc6-<arch>-cross for a dynamic binary
            self.prefix = [qemu, *_qemu_cpu(qemu, cpu), *(["-L", str(sysroot)] if sysroot.is_dir() else [])]
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
