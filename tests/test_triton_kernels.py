"""sparsecc's generated Triton kernels: parity with eager PyTorch in the Triton interpreter on CPU tensors, and
ahead-of-time compilation of every variant for sm_80, sm_87 (Jetson Orin), sm_90 and gfx942 (MI300).

Two processes, because Triton's interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported,
and a process that imported triton that way cannot compile for a GPU:
- this file, run as a script with TRITON_INTERPRET=1 in a subprocess, runs every case below in the
  interpreter and writes each case's mismatch (or None) and the kernels it generated to a JSON file;
- the pytest process meanwhile plans every case for the interpreter and for each GPU target (launchers inside
  `planned(target)` report the kernel sources they would run, and launch nothing) and compiles them, one
  process per CPU: the interpreter's variants for all four targets, each target's own variants (its tuned
  tiles, warps and stages) for it. A variant that fails to compile or needs more shared memory than the target
  has fails its case. test_interpreter_ran_the_planned_kernels checks that the interpreter ran exactly the
  kernels planned for it, so the compiled variants are the ones whose results were checked.

Shapes are <= 128 per dimension with ragged edges (N = 1, sizes that are no multiple of any tile, empty block
rows and CSR rows, zero nonzeros). References are eager float64 computations on the same (rounded) operands.
Tolerances: fp32 torch.testing's defaults. fp16 and bf16 kernels accumulate in fp32 and round once at the end,
so they are within about one unit in the last place of the reference rounded to their dtype:
fp16 rtol 2e-3 (2 ulp; fp16's ulp is 2**-10 relative), bf16 rtol 1.6e-2 (2 ulp; 2**-7), both with an atol of
1e-4 / 1e-3 for results that cancel to near zero. The optimizer cases compare with torch.optim run in fp32.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from sparsecc.codegen import triton as T  # noqa: E402  (after the skip)
from sparsecc.codegen.triton.generator import generate, imported_for_interpreter  # noqa: E402
from sparsecc.ops.block_sparse import to_blocks  # noqa: E402
from sparsecc.ops.csr import to_csr  # noqa: E402
from sparsecc.sparsity import NM  # noqa: E402

TOL = {torch.float32: {}, torch.float16: {"rtol": 2e-3, "atol": 1e-4}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3}}
CASES = {}


def case(fn):
    """A case runs launchers and returns (result, expected) pairs; expected has the result's dtype."""
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ref(fn, *tensors, dtype):
    """fn on float64 copies of the tensors, rounded to dtype."""
    return fn(*(t.double() for t in tensors)).to(dtype)


# --- block-sparse: y = x @ W^T, gx = g @ W (values read transposed), gW at the blocks -----------------------------

def block_case(out, inp, b, n, dtype, empty=False):
    grid = torch.rand(out // b, inp // b, generator=torch.Generator().manual_seed(b)) < 0.6
    grid[0, 0] = True
    grid[-1, :] = False                                     # a block-row with no blocks
    if inp // b > 1:
        grid[:, -1] = False                                 # a block-column with none (zero columns of gx)
    if empty:
        grid[:] = False
    mask = grid.repeat_interleave(b, 0).repeat_interleave(b, 1)
    w = randn(out, inp, dtype=dtype, seed=1) * mask
    values, rows, cols = to_blocks(w, mask, b)
    x, g = randn(n, inp, dtype=dtype, seed=2), randn(n, out, dtype=dtype, seed=3)
    dense_gw = ref(lambda g, x: g.t() @ x, g, x, dtype=dtype)
    return [(T.block_spmm(x, values, rows, cols, out), ref(lambda x, w: x @ w.t(), x, w, dtype=dtype)),
            (T.block_spmm(g, values.transpose(1, 2), cols, rows, inp), ref(lambda g, w: g @ w, g, w, dtype=dtype)),
            (T.block_sddmm(g, x, rows, cols, b), to_blocks(dense_gw, mask, b)[0])]


@case
def case_block_b16_fp32():
    return block_case(48, 80, 16, 37, torch.float32)


@case
def case_block_b16_fp32_one_row():
    return block_case(48, 80, 16, 1, torch.float32)


@case
def case_block_b12_fp32_padded():
    return block_case(36, 60, 12, 19, torch.float32)


@case
def case_block_b4_fp32_fma():
    return block_case(24, 20, 4, 9, torch.float32)


@case
def case_block_fp32_no_blocks():
    return block_case(32, 32, 16, 5, torch.float32, empty=True)


@case
def case_block_b32_fp16():
    return block_case(64, 96, 32, 21, torch.float16)


@case
def case_block_b64_fp32():         # b >= 64: the weight-gradient tile is not transposed (see case_block_b16_*)
    return block_case(128, 192, 64, 21, torch.float32)


@case
def case_block_b16_bf16():
    return block_case(48, 80, 16, 37, torch.bfloat16)


@contextlib.contextmanager
def tma_entries():
    """The interpreter's table row with TMA on (an sm_90 alternative elsewhere, which the interpreter never tunes),
    so the tensor-descriptor variants run here: the row is the test's to change, for the calls inside only."""
    rows = [T.CONFIGS[kernel]["interpreter"] for kernel in ("block_spmm", "block_sddmm")]
    for row in rows:
        row["TMA"] = 1
    try:
        yield
    finally:
        for row in rows:
            row["TMA"] = 0


@case
def case_block_b16_fp32_tma():      # block_sddmm has no TMA form for b < 64: its gathered, transposed tile runs
    with tma_entries():
        return block_case(48, 80, 16, 37, torch.float32)


@case
def case_block_b32_fp16_tma_one_row():
    with tma_entries():
        return block_case(64, 96, 32, 1, torch.float16)


@case
def case_block_b64_bf16_tma_split():    # 70 tokens: a ragged last step, read past N as zeros by the descriptors
    with tma_entries():
        return block_case(128, 192, 64, 70, torch.bfloat16)


@case
def case_block_b12_fp32_tma_padded():   # not a power of two: no TMA form, the gathered kernels run
    with tma_entries():
        return block_case(36, 60, 12, 19, torch.float32)


# --- CSR (unstructured): forward, input gradient on W^T's CSR through t_perm, gW at the nonzeros -------------------

def csr_case(out, inp, n, dtype, density=0.3, empty=False):
    mask = torch.rand(out, inp, generator=torch.Generator().manual_seed(5)) < (0.0 if empty else density)
    mask[3, :] = False                                      # an empty row
    mask[:, 7] = False                                      # an empty column (an empty row of W^T)
    w = randn(out, inp, dtype=dtype, seed=6) * mask
    i = to_csr(mask)
    values = w.flatten()[i["flat"]]
    x, g = randn(n, inp, dtype=dtype, seed=7), randn(n, out, dtype=dtype, seed=8)
    return [(T.csr_spmm(x, i["crow"], i["col"], values, out), ref(lambda x, w: x @ w.t(), x, w, dtype=dtype)),
            (T.csr_spmm(g, i["t_crow"], i["t_col"], values, inp, perm=i["t_perm"]),
             ref(lambda g, w: g @ w, g, w, dtype=dtype)),
            (T.csr_sddmm(g, x, i["crow"], i["col"]),
             ref(lambda g, x: (g.t() @ x).flatten(), g, x, dtype=dtype)[i["flat"]])]


@case
def case_csr_fp32():
    return csr_case(40, 70, 37, torch.float32)


@case
def case_csr_fp32_one_row_dense_rows():
    return csr_case(24, 100, 1, torch.float32, density=0.9)


@case
def case_csr_fp32_no_nonzeros():
    return csr_case(20, 30, 6, torch.float32, empty=True)


@case
def case_csr_fp16():
    return csr_case(40, 70, 37, torch.float16)


@case
def case_csr_bf16():
    return csr_case(40, 70, 37, torch.bfloat16)


# --- N:M in ELL layout [out, K] -----------------------------------------------------------------------------------

def nm_case(out, inp, n, m, tokens, dtype):
    w = randn(out, inp, dtype=dtype, seed=9)
    mask = NM(n, m).mask(w.float())
    w = w * mask
    i = to_csr(mask)
    k = inp * n // m
    values2d, col2d = w.flatten()[i["flat"]].view(out, k), i["col"].view(out, k)
    x, g = randn(tokens, inp, dtype=dtype, seed=10), randn(tokens, out, dtype=dtype, seed=11)
    gw = ref(lambda g, x: (g.t() @ x).flatten(), g, x, dtype=dtype)[i["flat"]].view(out, k)
    return [(T.nm_mm(x, values2d, col2d, out, m=m), ref(lambda x, w: x @ w.t(), x, w, dtype=dtype)),
            (T.nm_mm_t(g, values2d, col2d, inp, m=m), ref(lambda g, w: g @ w, g, w, dtype=dtype)),
            (T.nm_sddmm(g, x, col2d, m=m), gw)]


@case
def case_nm_2_4_fp32():
    return nm_case(40, 72, 2, 4, 37, torch.float32)


@case
def case_nm_3_8_fp32_one_row():
    return nm_case(20, 48, 3, 8, 1, torch.float32)


@case
def case_nm_1_32_fp32_wide_groups():
    return nm_case(18, 64, 1, 32, 5, torch.float32)


@case
def case_nm_2_4_fp16():
    return nm_case(40, 72, 2, 4, 37, torch.float16)


@case
def case_nm_2_4_bf16():
    return nm_case(40, 72, 2, 4, 37, torch.bfloat16)


# --- Channels: the k-channel weight gradient read from the full activation ---------------------------------------

def channels_case(n, out, c, dtype, dims=("in", "out")):
    g, x = randn(n, out, dtype=dtype, seed=12), randn(n, c, dtype=dtype, seed=13)
    x_view = torch.stack([x, -x], 2).view(n, 2 * c)[:, ::2]  # x as a strided view: read in place, not copied
    idx_in = torch.randperm(c, generator=torch.Generator().manual_seed(14))[:11]
    idx_out = torch.randperm(out, generator=torch.Generator().manual_seed(15))[:9]
    pairs = []
    if "in" in dims:
        pairs += [(T.channels_weight_grad(g, x_view, 19, "in"), ref(lambda g, x: g.t() @ x[:, :19], g, x, dtype=dtype)),
                  (T.channels_weight_grad(g, x, idx_in, "in"),
                   ref(lambda g, x: g.t() @ x[:, idx_in], g, x, dtype=dtype))]
    if "out" in dims:
        pairs += [(T.channels_weight_grad(g, x, 13, "out"), ref(lambda g, x: g[:, :13].t() @ x, g, x, dtype=dtype)),
                  (T.channels_weight_grad(g, x_view, idx_out, "out"),
                   ref(lambda g, x: g[:, idx_out].t() @ x, g, x, dtype=dtype))]
    return pairs


@case
def case_channels_fp32():
    return channels_case(37, 40, 72, torch.float32)


@case
def case_channels_fp32_one_row():
    return channels_case(1, 40, 72, torch.float32, dims=("in",))


@case
def case_channels_fp16():
    return channels_case(37, 40, 72, torch.float16)


@case
def case_channels_bf16():
    return channels_case(37, 40, 72, torch.bfloat16)


# --- fused optimizer updates over trained rows, against torch.optim ----------------------------------------------

ROWS = torch.tensor([3, 0, 17, 29, 8])


def optimizer_case(dtype, make_optimizer, update, rows, steps, transposed=False, state_names=()):
    """Runs `update(param, grad, rows, *state, step)` for `steps` steps on the 2-D view of a [30, 20] parameter
    (its transpose if `transposed`) and torch.optim on fp32 copies of the trained rows; compares the whole
    parameter (frozen rows unchanged) and the state."""
    base = randn(20, 30, seed=16).t() if transposed else randn(30, 20, seed=16)   # transposed: strides (1, 30)
    param = base.to(dtype)
    sel = rows if isinstance(rows, torch.Tensor) else torch.arange(rows)
    k = sel.shape[0]
    trained = param[sel].float().clone().requires_grad_()
    opt = make_optimizer(trained)
    state = [torch.zeros(k, 20, dtype=dtype) for _ in state_names]
    for step in range(1, steps + 1):
        grad = randn(k, 20, dtype=dtype, seed=100 + step)
        update(param, grad, rows, *state, step)
        trained.grad = grad.float()
        opt.step()
    expected = param.float().clone()
    expected[sel] = trained.detach()
    states = [(s, opt.state[trained][name].to(dtype)) for s, name in zip(state, state_names)]
    return [(param, expected.to(dtype)), *states]


def sgd(lr, **kw):
    return lambda p: torch.optim.SGD([p], lr=lr, **kw)


def adamw(lr, **kw):
    return lambda p: torch.optim.AdamW([p], lr=lr, **kw)


def swiglu_case(dtype, shape):
    """Both SwiGLU backward kernels in place (up <- d_gate, then g <- d_up) against float64 formulas; gate spans
    the sigmoid's saturated ends."""
    g, up = randn(*shape, dtype=dtype, seed=31), randn(*shape, dtype=dtype, seed=32)
    gate = (randn(*shape, seed=33) * 6).to(dtype)
    sigmoid = lambda z: torch.sigmoid(z)                                              # noqa: E731
    d_gate = ref(lambda d, u, z: d * u * sigmoid(z) * (1 + z * (1 - sigmoid(z))), g, up, gate, dtype=dtype)
    d_up = ref(lambda d, z: d * z * sigmoid(z), g, gate, dtype=dtype)
    T.swiglu_backward(up, g, gate, "gate")
    T.swiglu_backward(g, g, gate, "up")
    return [(up, d_gate), (g, d_up)]


@case
def case_swiglu_backward_fp32():
    return swiglu_case(torch.float32, (3, 45))       # 135 elements: three 64-element programs, the last ragged


@case
def case_swiglu_backward_bf16():
    return swiglu_case(torch.bfloat16, (2, 7, 9))


@case
def case_swiglu_backward_fp16():
    return swiglu_case(torch.float16, (64,))


@case
def case_sgd_nesterov_fp32():
    kw = {"momentum": 0.9, "weight_decay": 0.01, "nesterov": True}
    return optimizer_case(torch.float32, sgd(0.1, **kw), lambda p, g, r, b, s: T.sgd_rows(p, g, r, b, lr=0.1, **kw),
                          ROWS, 3, state_names=("momentum_buffer",))


@case
def case_sgd_plain_fp32_first_rows_tensor_lr():
    lr = torch.tensor(0.05)
    return optimizer_case(torch.float32, sgd(0.05), lambda p, g, r, s: T.sgd_rows(p, g, r, lr=lr), 7, 2)


@case
def case_sgd_momentum_fp32_transposed_view():
    return optimizer_case(torch.float32, sgd(0.1, momentum=0.5),
                          lambda p, g, r, b, s: T.sgd_rows(p, g, r, b, lr=0.1, momentum=0.5), ROWS, 2, transposed=True,
                          state_names=("momentum_buffer",))


@case
def case_sgd_momentum_fp16():
    return optimizer_case(torch.float16, sgd(0.1, momentum=0.9),
                          lambda p, g, r, b, s: T.sgd_rows(p, g, r, b, lr=0.1, momentum=0.9), ROWS, 1,
                          state_names=("momentum_buffer",))


@case
def case_sgd_momentum_bf16():
    return optimizer_case(torch.bfloat16, sgd(0.1, momentum=0.9),
                          lambda p, g, r, b, s: T.sgd_rows(p, g, r, b, lr=0.1, momentum=0.9), ROWS, 1,
                          state_names=("momentum_buffer",))


@case
def case_sgd_no_rows():
    return optimizer_case(torch.float32, sgd(0.1), lambda p, g, r, s: T.sgd_rows(p, g, r, lr=0.1), 0, 1)


ADAM_STATE = ("exp_avg", "exp_avg_sq")


@case
def case_adamw_fp32():
    return optimizer_case(torch.float32, adamw(0.01, weight_decay=0.1),
                          lambda p, g, r, m, v, s: T.adamw_rows(p, g, r, m, v, lr=0.01, step=float(s),
                                                                weight_decay=0.1),
                          ROWS, 3, state_names=ADAM_STATE)


@case
def case_adamw_fp32_device_scalars_first_rows():
    lr = torch.tensor(0.01)
    return optimizer_case(torch.float32, adamw(0.01, betas=(0.8, 0.99)),
                          lambda p, g, r, m, v, s: T.adamw_rows(p, g, r, m, v, lr=lr, step=torch.tensor(float(s)),
                                                                betas=(0.8, 0.99)),
                          9, 3, state_names=ADAM_STATE)


@case
def case_adamw_fp16():
    return optimizer_case(torch.float16, adamw(0.01),
                          lambda p, g, r, m, v, s: T.adamw_rows(p, g, r, m, v, lr=0.01, step=float(s)), ROWS, 1,
                          state_names=ADAM_STATE)


@case
def case_adamw_bf16():
    return optimizer_case(torch.bfloat16, adamw(0.01),
                          lambda p, g, r, m, v, s: T.adamw_rows(p, g, r, m, v, lr=0.01, step=float(s)), ROWS, 1,
                          state_names=ADAM_STATE)


# --- the interpreter subprocess -------------------------------------------------------------------------------------

def run_cases_in_interpreter(path: str) -> None:
    """(In the subprocess) run every case; write each one's error or None, and the kernels generated."""
    errors = {}
    for name, fn in CASES.items():
        try:
            for got, want in fn():
                torch.testing.assert_close(got, want, **TOL[want.dtype])
            errors[name] = None
        except Exception:
            errors[name] = traceback.format_exc()
    Path(path).write_text(json.dumps({"errors": errors, "kernels": sorted(T.generated_sources())}))


class Interpreter:
    """The subprocess running the cases, started once for the module; results() waits for it."""

    def __init__(self, out: Path):
        from conftest import triton_cannot_interpret     # here: gpu_check imports this file without pytest's tools
        self.out, self.refusal = out, triton_cannot_interpret()
        self._results = None
        if self.refusal:
            return
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        self.log = out.with_suffix(".log")
        with self.log.open("w") as log:   # a file, not a pipe: nobody reads while the compiles run
            self.proc = subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def results(self) -> dict:
        if self.refusal:
            pytest.skip(self.refusal)
        if self._results is None:
            self.proc.wait(timeout=900)
            assert self.proc.returncode == 0, f"interpreter subprocess failed:\n{self.log.read_text()[-5000:]}"
            self._results = json.loads(self.out.read_text())
        return self._results


@pytest.fixture(scope="module")
def interpreter(tmp_path_factory):
    run = Interpreter(tmp_path_factory.mktemp("triton_interpreter") / "results.json")
    yield run
    if not run.refusal and run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


# --- the tests: compile (while the subprocess interprets), then collect the interpreter's verdicts --------------------

def plans(name: str) -> dict[str, list]:
    """The kernel sources case `name` runs in the interpreter and on each GPU target."""
    out = {}
    for target in ("interpreter", *T.TARGETS):
        with T.planned(target) as sources:
            CASES[name]()
        out[target] = sources
    return out


def interpreter_only(source) -> bool:
    """A variant with the interpreter's bf16 upcast (`_up`): code no GPU runs (GPU variants feed bf16 to tl.dot)."""
    return re.search(r"_up(_|$)", source.name) is not None


def compile_jobs(planned: dict[str, list]) -> list[tuple]:
    """The interpreter's variants for every GPU target (but the interpreter-only bf16 upcasts), and each target's
    own variants for it."""
    return [(s, t) for s in planned["interpreter"] if not interpreter_only(s) for t in T.TARGETS] + \
        [(s, t) for t in T.TARGETS for s in planned[t]]


def production_calls() -> None:
    """Launcher calls at a model's sizes (4096 tokens): the tiles, warps and stages a GPU runs there, with every
    tuning candidate. Planned only (operands uninitialised): nothing runs."""
    n, size = 4096, 512
    for dtype, b, input_grad in ((torch.bfloat16, 16, False), (torch.bfloat16, 32, False),
                                 (torch.bfloat16, 64, True), (torch.bfloat16, 128, False), (torch.float32, 64, False)):
        r = size // b
        rows, cols = torch.arange(r).repeat_interleave(2), (torch.arange(2 * r) * 3) % r   # 2 blocks per row
        values, x = torch.empty(2 * r, b, b, dtype=dtype), torch.empty(n, size, dtype=dtype)
        T.block_spmm(x, values, rows, cols, size)
        if input_grad:
            T.block_spmm(x, values.transpose(1, 2), cols, rows, size)
        if b > 16:
            T.block_sddmm(x, x, rows, cols, b)
    x = torch.empty(n, size, dtype=torch.bfloat16)
    i = to_csr(torch.rand(size, size, generator=torch.Generator().manual_seed(0)) < 0.1)
    values = torch.empty(i["col"].shape[0], dtype=torch.bfloat16)
    T.csr_spmm(x, i["crow"], i["col"], values, size)
    T.csr_spmm(x, i["t_crow"], i["t_col"], values, size, perm=i["t_perm"])
    T.csr_sddmm(x, x, i["crow"], i["col"])
    j = torch.arange(size // 2)
    col2d = (j // 2 * 4 + j % 2).repeat(size, 1)                      # 2:4: places 0 and 1 of every group
    values2d = torch.empty(size, size // 2, dtype=torch.bfloat16)
    T.nm_mm(x, values2d, col2d, size, m=4)
    T.nm_mm_t(x, values2d, col2d, size, m=4)
    T.nm_sddmm(x, x, col2d, m=4)
    T.channels_weight_grad(x, x, torch.arange(0, size, 4), "in")
    T.swiglu_backward(x, x, x, "gate")
    T.swiglu_backward(x, x, x, "up")


@pytest.fixture(scope="module")
def production_plans() -> dict[str, list]:
    out = {}
    for target in T.TARGETS:
        with T.planned(target) as sources:
            production_calls()
        out[target] = sources
    return out


@pytest.fixture(scope="module")
def planned_cases():
    return {name: plans(name) for name in CASES}


@pytest.fixture(scope="module")
def compiled(interpreter, planned_cases, production_plans):
    """(kernel, target) -> compile error or None, for every case and the production sizes, compiled in one process
    per CPU. aot_compile fails a variant that spills registers or needs more shared memory than its target has."""
    if imported_for_interpreter():
        pytest.skip("TRITON_INTERPRET=1 was set for the pytest process itself; it cannot compile for GPUs")
    jobs = [job for planned in planned_cases.values() for job in compile_jobs(planned)]
    jobs += [(s, t) for t, sources in production_plans.items() for s in sources]
    return T.compile_all(jobs)


@pytest.mark.slow      # ~2 CPU-minutes: every variant compiled ahead of time for four GPU targets
@pytest.mark.parametrize("name", CASES)
def test_every_variant_compiles_for_gpu_targets(name, compiled, planned_cases):
    jobs = compile_jobs(planned_cases[name])
    assert jobs or name.endswith(("no_blocks", "no_rows")), "only the cases of empty operands launch nothing"
    failures = {f"{s.name} on {t}": compiled[s.name, t] for s, t in jobs if compiled[s.name, t]}
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


@pytest.mark.slow
@pytest.mark.parametrize("target", T.TARGETS)
def test_production_variants_compile_fit_and_do_not_spill(target, compiled, production_plans):
    """Every variant (each tuning candidate) a GPU of the target runs at a model's sizes compiles, fits its shared
    memory and spills no register (aot_compile checks both), block-sparse ones included at b = 16 ... 128."""
    sources = production_plans[target]
    kinds = {s.op for s in sources}
    assert {"block_spmm", "block_sddmm", "csr_spmm", "csr_sddmm", "nm_mm", "channels_wgrad", "swiglu_backward"} <= kinds, kinds
    if target != "sm_87":                  # the Orin row has alternatives for fewer kernels
        assert sum(s.op == "block_spmm" for s in sources) >= 2 * 6, "several tuning candidates per call"
    failures = {s.name: compiled[s.name, target] for s in sources if compiled[s.name, target]}
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


@pytest.mark.slow
def test_block_kernels_run_on_hoppers_warpgroup_mma_with_pipelined_loads(compiled, production_plans):
    """On sm_90 every 16-bit block-sparse variant at a model's sizes (each tuning candidate, b = 16 ... 128) lowers
    its tl.dot to wgmma, not Ampere's mma.sync (which needs no M >= 64 edge: the transposed weight-gradient tile of
    b < 64 is what gives it one), and software-pipelines its loads (cp.async; the TMA candidates' tiles through
    cp.async.bulk.tensor). Compiled already: Triton's cache."""
    from sparsecc.codegen.triton import aot
    sources = [s for s in production_plans["sm_90"] if s.op in ("block_spmm", "block_sddmm")
               and re.search(r"_(bf16|fp16)_", s.name) and not compiled[s.name, "sm_90"]]
    assert {int(re.search(r"_b(\d+)_", s.name).group(1)) for s in sources} >= {16, 32, 64, 128}
    assert {s.op for s in sources} == {"block_spmm", "block_sddmm"}
    assert {s.op for s in sources if s.scratch} == {"block_spmm", "block_sddmm"}, "TMA candidates of both"
    for s in sources:
        ptx = aot.aot_compile(generate(s), "sm_90").asm["ptx"]
        assert "wgmma.mma_async" in ptx and "mma.sync" not in ptx, s.name
        if s.scratch:                       # the operand tiles arrive by the Tensor Memory Accelerator
            assert "cp.async.bulk.tensor" in ptx and "_tma" in s.name, s.name
        else:
            assert re.search(r"cp\.async\.c[ag]", ptx) and "cp.async.bulk.tensor" not in ptx, s.name


def test_aot_rejects_a_spilling_variant_and_reads_resources():
    """resources() reads registers, spills and shared memory from the compiled kernel (ptxas -v / the AMDGPU
    metadata); aot_compile turns a spill into AOTError. The spilling kernel: 32 x 64 fp32 FMA tiles, one warp."""
    if imported_for_interpreter():
        pytest.skip("TRITON_INTERPRET=1 was set for the pytest process itself")
    from sparsecc.codegen.triton import aot
    ok = aot.aot_compile(generate(T.templates.block_spmm("bf16", 64, 64, BLOCK_K=64, GROUP_M=8, num_warps=4,
                                                          num_stages=3)), "sm_90")
    used = aot.resources(ok)
    assert used["spills"] == 0 and 0 < used["registers"] <= 255 and 0 < used["shared"] <= T.SHARED_MEMORY["sm_90"]
    spilling = generate(T.templates.block_spmm("fp32", 64, 32, BLOCK_K=64, num_warps=1, num_stages=1))
    with pytest.raises(aot.AOTError, match="spills registers"):
        aot.aot_compile(spilling, "sm_80")


def test_interpreter_ran_split_k_and_multi_block_steps(interpreter):
    """The interpreted cases reach every branch of the block kernels: several blocks per K step (KB > 1), several
    blocks per weight-gradient tile (NB > 1), split-K with its fp32 workspace, padded blocks, FMA blocks, and the
    weight-gradient tile computed transposed (b < 64) and not (b = 64), and the tensor-descriptor (TMA) forms."""
    names = " ".join(interpreter.results()["kernels"])
    for part in ("_KB2", "_NB2", "_split", "block_spmm_fp32_b12", "_fma", "_vt", "_tr", "block_sddmm_fp32_b64",
                 "block_spmm_fp16_b32_BM16_KB1_G2_vt_tma", "block_sddmm_bf16_b64_BK16_NB1_split_tma"):
        assert part in names, part
    assert not re.search(r"block_sddmm_\w+_b(16|32)_\w*_tma|_b12_\w*_tma", names), "no TMA form there"


@pytest.mark.parametrize("name", CASES)
def test_interpreter_matches_eager(name, interpreter):
    error = interpreter.results()["errors"][name]
    assert error is None, error


def test_interpreter_ran_the_planned_kernels(interpreter, planned_cases):
    """The kernels compiled above (the interpreter's plans) are exactly the kernels the interpreter ran."""
    planned = {s.name for p in planned_cases.values() for s in p["interpreter"]}
    assert set(interpreter.results()["kernels"]) == planned


def test_generated_sources_and_cache_files(tmp_path):
    """Every generated kernel's source is retrievable by name, lives in the cache as <hash>.py, and dumps."""
    source = T.templates.block_spmm("fp16", 32, 64)
    kernel = generate(source)
    assert T.generated_sources()[source.name] == source.text == kernel.path.read_text()
    assert kernel.path.parent.name == "triton"
    assert (tmp_path / "triton" / f"{source.name}.py") in T.dump_sources(tmp_path)


def test_gpu_scripts_exit_cleanly_without_a_gpu(tmp_path):
    """scripts/gpu_check.py (the one-go GPU check) and the GPU benchmarks parse, run and exit 0 here, saying why
    nothing was measured."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run scripts/gpu_check.py itself")
    root = Path(__file__).parents[1]
    for cmd in (["scripts/gpu_check.py", str(tmp_path / "gpu")], ["benchmarks/bench_gpu_train.py", "--quick"],
                ["benchmarks/bench_triton.py", "--quick"]):
        out = subprocess.run([sys.executable, *cmd], cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "no CUDA" in out.stdout, out.stdout
    assert "no CUDA GPU" in (tmp_path / "gpu" / "summary.txt").read_text()
    bad = subprocess.run([sys.executable, "scripts/gpu_check.py", str(tmp_path / "gpu"), "--steps", "env,kernel"],
                         cwd=root, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown step(s) kernel; the steps are env, llm_memory, kernels" in bad.stdout


def test_configs_cover_every_kernel_and_target():
    for kernel, rows in T.CONFIGS.items():
        assert set(rows) == {*T.TARGETS, "interpreter"}, kernel
        for target, cfg in rows.items():
            assert {"num_warps", "num_stages"} <= set(cfg), (kernel, target)
            assert any(k.startswith("BLOCK_") for k in cfg), (kernel, target)
    for kernel, rows in T.configs.TUNING.items():               # alternatives: the same keys as the entry's
        for target, alternatives in rows.items():
            assert alternatives and all(set(a) == set(T.CONFIGS[kernel][target]) for a in alternatives), kernel
    # small calls and the interpreter take the entry alone; model-size calls a few candidates, the entry first
    assert T.configs.candidates("block_spmm", "interpreter", BLOCK_M=4096) == [T.config("block_spmm", "interpreter")]
    assert len(T.configs.candidates("block_spmm", "sm_90", BLOCK_M=16)) == 1
    big = T.configs.candidates("block_spmm", "sm_90", BLOCK_M=4096)
    assert big[0] == T.config("block_spmm", "sm_90") and 2 <= len(big) <= 5
    assert sum(c["TMA"] for c in big) == 2 and not any(c["TMA"] for c in T.configs.candidates(
        "block_spmm", "sm_80", BLOCK_M=4096)), "tensor descriptors: sm_90 alternatives only"


if __name__ == "__main__":
    run_cases_in_interpreter(sys.argv[1])
