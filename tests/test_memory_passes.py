"""The liveness model, reorder_for_memory and fuse_optimizer's write-back placement, on graphs small enough to
count by hand: expected bytes are written out in the tests, and numbers are compared with eager PyTorch."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import sparsecc
from sparsecc.memory import liveness, measure_peak, storage_roots, writes_input
from sparsecc.passes import Plan
from sparsecc.passes import reorder_for_memory as rfm
from sparsecc.pipeline import TRAIN_STEP_PASSES, run_passes

NO_PLAN = Plan((), 1)


def names(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


# ---- liveness ---------------------------------------------------------------------------------------------

def test_liveness_bytes_counted_by_hand():
    """x: 1000 float32 (4000 bytes), w: 1000 float32; graph inputs are resident and not counted."""
    def f(x, w):
        t1 = x * 2                 # mul      +4000                                  4000
        t2 = x * 3                 # mul_1    +4000                                  8000
        v = t1.view(10, 100)       # view     a view: no bytes, keeps t1 alive       8000
        r1 = v.sum()               # sum_1    +4; t1's last use, freed after          8004 -> 4004
        w.mul_(r1)                 # mul_     in place into an input: no bytes       4004
        r2 = t2.sum()              # sum_2    +4; t2 stays: a view of it is returned  4008
        out = r1 + r2              # add      +4; r1 and r2 freed after               4012 -> 4004
        return out, t2[:10]        # slice    a view of t2: no bytes                 4004
    gm = make_fx(f)(torch.randn(1000), torch.randn(1000))
    timeline = liveness(gm)
    assert timeline.names == ["mul", "mul_1", "view", "sum_1", "mul_", "sum_2", "add", "slice_1"]
    assert timeline.live_bytes == [4000, 8000, 8000, 8004, 4004, 4008, 4012, 4004]
    assert timeline.peak == 8004


def test_each_result_of_a_multi_result_op_dies_on_its_own():
    """sort's values (1000 float32, 4000 B) and indices (1000 int64, 8000 B) are two storages: the indices go
    after their sum, so the product allocates beside the values only (not beside both: 16,008 B)."""
    def f(x):
        values, indices = torch.sort(x)
        total = indices.sum()
        return values * 2, total
    t = liveness(make_fx(f)(torch.randn(1000)))
    assert t.names == ["sort", "getitem", "getitem_1", "sum_1", "mul"]
    assert t.live_bytes == [12000, 12000, 12000, 12008, 8008]


def test_fused_liveness_counted_by_hand():
    """As Inductor runs it: a pointwise value read only by pointwise ops is never stored, and a pointwise
    kernel writes into a same-sized input that dies there. x: [4, 8], w: [8, 16] float32 (inputs: resident)."""
    def f(x, w):
        a = x * 2                  # mul      pointwise, read only by add: fused away       plain +128
        b = a + 1                  # add      +128 (read by mm: stored)                     plain +128; a freed
        c = b @ w                  # mm       +256; b freed after                           384 -> 256
        d = c.relu()               # relu     fused away (read only by mul_1)               plain 512 -> 256
        return d * 3               # mul_1    reads c (through d), which dies here and has its size: reused
    gm = make_fx(f)(torch.randn(4, 8), torch.randn(8, 16))
    plain, fused = liveness(gm), liveness(gm, fused=True)
    assert plain.names == fused.names == ["mul", "add", "mm", "relu", "mul_1"]
    assert plain.live_bytes == [128, 256, 384, 512, 512]
    assert fused.live_bytes == [0, 128, 384, 256, 256]
    assert (plain.peak, fused.peak) == (512, 384)


# ---- reorder_for_memory -----------------------------------------------------------------------------------

def big_temporary_then_small_residents(x, y):
    """In this order the peak is the big temporary t alone; the greedy scheduler, preferring small
    allocations, runs the four residents first and then t on top of them."""
    t = x * 2                      # 4000 bytes, dies at once
    r = t.sum()
    s1, s2, s3, s4 = y + 1, y + 2, y + 3, y + 4    # 400 bytes each, live until the sum at the end
    return r + s1 + s2 + s3 + s4


WRAPPER = """
def call(self, args):
    arg0_1, arg1_1 = args
    args.clear()
    assert_size_stride(arg0_1, (8, 16), (16, 1), 'input')
    buf0 = empty_strided_cpu((8, 16), (16, 1), torch.float32)
    cpp_fused_exp_0(arg0_1, buf0)
    del arg0_1
    buf1 = empty_strided_cpu((8, 8), (8, 1), torch.float32)
    extern_kernels.mm(buf0, reinterpret_tensor(arg1_1, (16, 8), (1, 16), 0), out=buf1)
    buf2 = buf0; del buf0  # reuse
    buf3 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(reinterpret_tensor(buf1, (1, 1, 8, 8), (64, 64, 8, 1), 0), reinterpret_tensor(buf1, (1, 1, 8, 8), (64, 64, 8, 1), 0), reinterpret_tensor(buf1, (1, 1, 8, 8), (64, 64, 8, 1), 0))
    buf4 = buf3[0]
    del buf3
    buf5 = reinterpret_tensor(buf4, (8, 8), (8, 1), 0); del buf4  # reuse
    del buf1
    buf6 = empty_strided_cpu((8, ), (1, ), torch.int64)
    cpp_fused_sum_1(buf5, buf2, buf6)
    del buf2
    return (buf5, buf6, )
"""


def test_inductor_buffer_plan_counted_by_hand():
    """Inductor's wrapper walked statement by statement: buf0 512 B; buf1 256 B; buf2 takes over buf0; the
    attention call allocates its output (256 B) and logsumexp (8 floats, 32 B), which dies with the tuple;
    buf5 keeps the output's storage after buf4 is deleted; buf6 8 int64 (64 B); graph inputs are not counted."""
    from sparsecc.inductor_memory import timeline
    plan = timeline(WRAPPER, [torch.randn(8, 16), torch.randn(8, 16)])
    assert plan.names == ["buf0", "del arg0_1", "buf1", "buf2", "del buf0", "buf3", "buf4", "del buf3", "buf5",
                          "del buf4", "del buf1", "buf6", "del buf2"]
    assert plan.live_bytes == [512, 512, 768, 768, 768, 1056, 1056, 1024, 1024, 1024, 768, 832, 320]
    # an input the wrapper owns (a backward's saved activation) counts from the start until its `del`
    owned = timeline(WRAPPER, [torch.randn(8, 16), torch.randn(8, 16)], owned=[0])
    assert owned.live_bytes[:3] == [1024, 512, 768] and owned.peak == 1056
    assert plan.peak == 1056 and plan.model == "Inductor's buffer plan"
    # a statement it cannot follow (an op whose results are not named) gives no plan rather than a wrong one
    assert timeline(WRAPPER.replace("    buf6 = empty", "    torch.ops.aten.foo.default(buf5)\n    buf6 = empty"),
                    [torch.randn(8, 16), torch.randn(8, 16)]) is None


CPU_MM_WRAPPER = """
def call(self, args):
    arg0_1, arg1_1 = args
    args.clear()
    buf0 = empty_strided_cpu((64, 32), (32, 1), torch.bfloat16)
    extern_kernels.mm(arg0_1, reinterpret_tensor(arg1_1, (1024, 32), (1, 1024), 0), out=buf0)
    return (buf0, )
"""


def test_the_walker_counts_a_bfloat16_cpu_matmuls_packed_operands():
    """On the CPU oneDNN packs a bfloat16 matmul's operands into buffers of its own while it runs (float32: none):
    the plan's peak is the measured peak of the same matmul, and the float32 plan is its output alone."""
    from sparsecc.inductor_memory import timeline
    x, w = torch.randn(64, 1024).bfloat16(), torch.randn(32, 1024).bfloat16()
    plan = timeline(CPU_MM_WRAPPER, [x, w])
    assert plan.peak == measure_peak(lambda: torch.mm(x, w.t())) > 64 * 32 * 2
    assert "extern_kernels.mm (while it runs)" in plan.names
    f32 = timeline(CPU_MM_WRAPPER.replace("bfloat16", "float32"), [x.float(), w.float()])
    assert f32.peak == 64 * 32 * 4


CUDA_WRAPPER = """
def call(self, args):
    arg0_1, arg1_1 = args
    args.clear()
    assert_size_stride(arg0_1, (8, 16), (16, 1))
    with torch.cuda._DeviceGuard(0):
        torch.cuda.set_device(0)
        arg1_1 = copy_misaligned(arg1_1)
        buf0 = empty_strided_cuda((8, 16), (16, 1), torch.float32)
        # Topologically Sorted Source Nodes: [exp], Original ATen: [aten.exp]
        stream0 = get_raw_stream(0)
        triton_poi_fused_exp_0.run(arg0_1, buf0, 128, stream=stream0)
        del arg0_1
        buf1 = empty_strided_cuda((8, 8), (8, 1), torch.float32)
        extern_kernels.mm(buf0, reinterpret_tensor(arg1_1, (16, 8), (1, 16), 0), out=buf1)
        buf2 = buf0; del buf0  # reuse
        triton_poi_fused_add_1.run(buf2, buf1, 128, stream=stream0)
        del buf1
    return (buf2, )
"""

PARTITIONED = """
def partition_0(args):
    arg0_1, arg1_1 = args
    args.clear()
    with torch.cuda._DeviceGuard(0):
        torch.cuda.set_device(0)
        buf0 = empty_strided_cuda((8, 16), (16, 1), torch.float32)
        stream0 = get_raw_stream(0)
        triton_poi_fused_exp_0.run(arg0_1, buf0, 128, stream=stream0)
        del arg0_1
        buf1 = empty_strided_cuda((8, 8), (8, 1), torch.float32)
        extern_kernels.mm(buf0, reinterpret_tensor(arg1_1, (16, 8), (1, 16), 0), out=buf1)
        del arg1_1
        buf9 = empty_strided_cuda((4, ), (1, ), torch.float32)
    return (buf0, buf1, )


def partition_1(args):
    buf0, buf2 = args
    args.clear()
    with torch.cuda._DeviceGuard(0):
        torch.cuda.set_device(0)
        buf3 = buf0; del buf0  # reuse
        stream0 = get_raw_stream(0)
        triton_poi_fused_add_1.run(buf3, buf2, 128, stream=stream0)
        del buf2
    return (buf3, )


class Runner:
    def __init__(self, partitions):
        self.partitions = partitions

    def call(self, args):
        arg0_1, arg1_1 = args
        args.clear()
        partition0_args = [arg0_1, arg1_1]
        del arg0_1, arg1_1
        (buf0, buf1) = self.partitions[0](partition0_args)
        del partition0_args
        buf2 = torch.ops.aten.relu.default(buf1)
        del buf1
        partition1_args = [buf0, buf2]
        del buf0, buf2
        (buf3,) = self.partitions[1](partition1_args)
        del partition1_args
        return (buf3, )

runner = Runner(partitions=[partition_0, partition_1,])
call = runner.call
"""


@pytest.mark.slow     # ~40 s: a training step compiled on the CPU, then its CUDA wrapper generated twice
def test_the_walker_follows_the_cuda_wrappers_inductor_generates_for_a_training_step(tmp_path):
    """Inductor's own CUDA wrapper for a bf16 Llama's sparse-update step with the fused loss, generated on this
    CPU-only machine with fake CUDA tensors (tests/fake_cuda.py), plain and in graph partitions (its form under
    CUDA graphs): the walker follows every statement (device guard, streams, copy_if_misaligned, the fused loss's
    op, the partition) and ends with exactly the step's outputs live. Written when the walker stopped at
    copy_if_misaligned (torch 2.13's name; the hand-written wrappers above have another version's), which
    would have turned the memory model on a GPU back into the liveness model."""
    out = tmp_path / "found.json"
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "fake_cuda.py"), str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["fused_loss"] and found["output_bytes"] == 4          # the loss, float32
    for form in ("plain", "partitioned"):
        walked = found[form]
        assert walked["model"] == "Inductor's buffer plan", (form, walked)
        assert walked["final_live"] == found["output_bytes"], (form, walked)
        assert {"empty_strided_cuda(", "get_raw_stream(", "torch.cuda._DeviceGuard(",
                "torch.ops.sparsecc.linear_cross_entropy.default("} <= set(walked["statements"]), form
        if torch.__version__ >= "2.13":                                # 2.11's wrappers have no copy_if_misaligned
            assert "copy_if_misaligned(" in walked["statements"], form
    assert "def partition_0(args):" in found["partitioned"]["statements"]
    assert found["partitioned"]["peak"] == found["plain"]["peak"] > 0     # one partition: the same buffers
    # share_matmul_operands: the residual gradient (float32 math rounded to bf16, read as 2-D by mms and as is by the
    # residual add) is one bf16 buffer; without the pass Inductor also kept its float32 value, [2, 12, 32], alive
    # for the add (plan 28,548 B there; 25,604 B with the pass)
    assert "2, 12, 32" not in found["plain"]["float32_buffers"], found["plain"]["float32_buffers"]


@pytest.mark.slow     # ~20 s
def test_model_gpu_plan_script_models_the_benchmarks_gpu_step_on_this_cpu():
    """scripts/model_gpu_plan.py (bench_llm_memory's GPU step, its CUDA plan modelled here) follows Inductor's
    CUDA wrapper of the step to its end: the quick configuration's peak and the scheme's AdamW state."""
    run = subprocess.run([sys.executable, "scripts/model_gpu_plan.py", "quick"], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    line = next(line for line in run.stdout.splitlines() if "modelled CUDA step peak" in line)
    assert "(Inductor's buffer plan)" in line and float(line.split("peak ")[1].split(" MiB")[0]) > 0


def test_a_cuda_wrapper_and_its_graph_partitions_are_walked():
    """The statements a CUDA wrapper adds (device guard block, set_device, streams, copy_misaligned of an input,
    kernel launches on a stream) allocate nothing. Graph partitions (Inductor's default on CUDA) are functions the
    call hands a list of arguments: what they return lives on under the caller's names, their other locals (buf9,
    16 B) go when they return, and an argument lives while the list, the caller's name or the partition's holds
    it. An `a, b = ...` assignment it does not know gives no plan."""
    from sparsecc.inductor_memory import timeline
    inputs = [torch.randn(8, 16), torch.randn(8, 16)]
    plan = timeline(CUDA_WRAPPER, inputs)
    assert plan.names == ["buf0", "del arg0_1", "buf1", "buf2", "del buf0", "del buf1"]
    assert plan.live_bytes == [512, 512, 768, 768, 768, 512] and plan.peak == 768
    parts = timeline(PARTITIONED, inputs)
    assert parts.names == ["del arg0_1, arg1_1", "partition_0:buf0", "partition_0:del arg0_1", "partition_0:buf1",
                           "partition_0:del arg1_1", "partition_0:buf9", "del partition0_args", "buf2", "del buf1",
                           "del buf0, buf2", "partition_1:buf3", "partition_1:del buf0", "partition_1:del buf2",
                           "del partition1_args"]
    assert parts.live_bytes == [0, 512, 512, 768, 768, 784, 768, 1024, 768, 768, 768, 768, 512, 512]
    assert timeline(CUDA_WRAPPER.replace("buf1 = empty_strided_cuda", "buf1, buf9 = empty_strided_cuda"),
                    inputs) is None
    assert timeline(PARTITIONED.replace("partition_1,]", "]"), inputs) is None      # a partition it cannot find


def test_the_walker_follows_in_place_fallbacks_views_returned_and_partitions_returning_nothing():
    """Forms met in wrappers Inductor generated on GPUs: an in-place fallback op called for its effect
    (`aten.scatter_reduce_.two(buf2, ...)`) allocates nothing (an op whose result is dropped still gives no plan);
    a result returned as a view of a buffer (`return (reinterpret_tensor(buf2, ...), )`); a host buffer in pinned
    memory and a copy into a buffer (`buf2.copy_(buf1, True)`); a partition that returns nothing (`() = ...`),
    whose locals all go when it returns; a backward's `None` gradients of frozen inputs among its results (the
    walker gave no plan for every backward of a sparse update through the backend until 2026-12-01)."""
    from sparsecc.inductor_memory import timeline
    inputs = [torch.randn(8, 16), torch.randn(8, 16)]
    scatter = "        aten.scatter_reduce_.two(buf2, 0, reinterpret_tensor(arg1_1, (8, 8), (16, 1), 0), buf1, " \
              "reduce='amax', include_self=False)\n        buf2.copy_(buf1, True)\n        del buf1"
    pinned = "        del arg0_1\n        buf7 = empty_strided_cpu_pinned((1, ), (1, ), torch.float64)\n"
    view = "return (reinterpret_tensor(buf2, (128, ), (1, ), 0), )"
    varied = CUDA_WRAPPER.replace("        del buf1", scatter).replace("return (buf2, )", view).replace(
        "        del arg0_1\n", pinned)
    walked = timeline(varied, inputs)
    assert walked.names == ["buf0", "del arg0_1", "buf7", "buf1", "buf2", "del buf0", "del buf1"]
    assert walked.live_bytes == [b + 8 * (i >= 2) for i, b in enumerate([512, 512, 512, 768, 768, 768, 512])]
    assert timeline(CUDA_WRAPPER.replace("        del buf1", "        aten.relu.default(buf1)\n        del buf1"),
                    inputs) is None
    with_nones = timeline(CUDA_WRAPPER.replace("return (buf2, )", "return (None, buf2, None, )"), inputs)
    assert with_nones is not None and with_nones.live_bytes == timeline(CUDA_WRAPPER, inputs).live_bytes
    nothing = PARTITIONED.replace("    return (buf3, )\n\n\nclass", "    return ()\n\n\nclass").replace(
        "(buf3,) = self.partitions[1]", "() = self.partitions[1]").replace(
        "        return (buf3, )", "        return ()")
    parts = timeline(nothing, inputs)
    assert parts.names[-4:] == ["partition_1:buf3", "partition_1:del buf0", "partition_1:del buf2",
                                "del partition1_args"]
    assert parts.live_bytes[-4:] == [768, 768, 512, 0] and parts.peak == timeline(PARTITIONED, inputs).peak == 1024


def test_reorder_keeps_the_order_when_the_schedule_would_raise_the_peak():
    gm = make_fx(big_temporary_then_small_residents)(torch.randn(1000), torch.randn(100))
    original = names(gm)
    # graph order: t 4000, r +4 = 4004 (then t dies); residents 4 + 4 * 400 = 1604, + the first add 2004
    assert liveness(gm).peak == 4004
    # greedy order: the residents 1600, t on top 5600, r 5604
    assert liveness(gm, rfm.schedule(gm)).peak == 5604
    result = rfm.reorder_for_memory(gm, NO_PLAN)
    assert names(gm) == original
    assert result.counts == {"peak_bytes_before": 4004, "peak_bytes_after": 4004}
    assert liveness(gm).peak == 4004


def two_temporaries(x):
    t1, t2 = x * 2, x * 3          # 4000 bytes each
    return t1.sum() + t2.sum()


def test_reorder_takes_the_schedule_when_it_lowers_the_peak():
    gm = make_fx(two_temporaries)(torch.randn(1000))
    assert names(gm) == ["mul", "mul_1", "sum_1", "sum_2", "add"]
    x = torch.randn(1000)
    expected = two_temporaries(x)
    result = rfm.reorder_for_memory(gm, NO_PLAN)
    # each temporary is reduced before the next is made: 4000 + 4 + 4000 + 4 at most, not 8000 + 4
    assert names(gm) == ["mul", "sum_1", "mul_1", "sum_2", "add"]
    assert result.counts == {"peak_bytes_before": 8004, "peak_bytes_after": 4008}
    assert liveness(gm).peak == 4008
    torch.testing.assert_close(gm(x), expected)


def test_a_read_after_an_in_place_write_stays_after_it():
    """b reads w after w was overwritten: no schedule may move it before the write."""
    def f(w, x):
        a = x * 2
        w.copy_(a)
        b = w.sum()                # small, so the greedy scheduler would like it first
        return b
    gm = make_fx(f)(torch.randn(1000), torch.randn(1000))
    order = [n.name for n in rfm.schedule(gm)]
    write = next(n.name for n in gm.graph.nodes if writes_input(n))
    assert order.index(write) < order.index("sum_1"), order
    w, x = torch.randn(1000), torch.randn(1000)
    rfm.reorder_for_memory(gm, NO_PLAN)
    torch.testing.assert_close(gm(w, x), (x * 2).sum())


def test_a_dependency_cycle_is_an_explicit_error(monkeypatch):
    """A RuntimeError naming the stuck nodes (it was an assert, which python -O removes)."""
    gm = make_fx(two_temporaries)(torch.randn(10))
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cyclic = nx.DiGraph()
    cyclic.add_nodes_from(nodes)
    cyclic.add_edges_from([(nodes[0], nodes[1]), (nodes[1], nodes[0])])
    monkeypatch.setattr(rfm, "_dependency_dag", lambda gm, nodes: cyclic)
    with pytest.raises(RuntimeError, match=r"cycle; 2 nodes could not be scheduled \(first: mul, mul_1\)"):
        rfm.schedule(gm)


# ---- fuse_optimizer: the in-place update goes after the last read of the old value ------------------------

class RightOperand(nn.Module):
    """w is the right operand of a GEMM: its gradient (tanh(a(x))^T @ g) is computed before the input gradient
    g @ w^T, which still reads w; a's weight and bias are trained through that input gradient."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return torch.mm(torch.tanh(self.a(x)), self.w)


def test_update_is_written_after_a_later_reader_of_the_old_value():
    torch.manual_seed(0)
    model, x, y = RightOperand(), torch.randn(6, 5), torch.randn(6, 3)
    step = sparsecc.compile_train_step(copy.deepcopy(model), F.mse_loss, optimizer=sparsecc.SGD(lr=0.5),
                                       update=sparsecc.UpdateScheme.full(), example_inputs=(x, y), executor="eager")
    joint, plan = step.joint_graph(x, y)
    # every training pass but the scheduler, whose read-before-write edges would repair a misplaced write
    run_passes(joint, plan, [p for p in TRAIN_STEP_PASSES if p is not rfm.reorder_for_memory])

    nodes = list(joint.graph.nodes)
    placeholders = joint.graph.find_nodes(op="placeholder")
    w = placeholders[next(p.index for p in plan.params if p.name == "w")]
    roots = storage_roots(joint)
    write = next(n for n in nodes if writes_input(n) and roots[n.args[0]] is w)
    new_value = write.args[1]
    readers = [n for n in nodes if n is not write and any(roots[a] is w for a in n.all_input_nodes)]
    later = [n for n in readers if nodes.index(n) > nodes.index(new_value)]
    assert later, "the graph must have a read of the old w after its new value exists"
    assert all(nodes.index(n) < nodes.index(write) for n in readers), [n.name for n in readers]

    params = {p.name: dict(model.named_parameters())[p.name].detach().clone() for p in plan.params}
    inputs = [params[p.name] for p in sorted(plan.params, key=lambda p: p.index)]
    inputs += [x, y, torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
    assert len(placeholders) == len(inputs)
    (loss,) = joint(*inputs)                                   # updates params in place

    reference = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_loss = F.mse_loss(model(x), y)
    ref_loss.backward()
    reference.step()
    torch.testing.assert_close(loss, ref_loss.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), msg=lambda m: f"{name}: {m}")
