"""Every private PyTorch API sparsecc relies on, in one module, each with what the use depends on.

Tested with torch 2.11 (the GPU image) and 2.13 (CI); pyproject.toml pins torch below 2.14, the first
release none of this has been tried with. When a release moves one of these, it breaks here, by name.
"""
from __future__ import annotations

import contextlib
import inspect
from unittest import mock

import torch
from torch._decomp import core_aten_decompositions                 # noqa: F401  the core ATen opset's decompositions (artifacts)
from torch._dynamo.backends.common import aot_autograd             # noqa: F401  AOTAutograd with our fw/bw compilers and partition_fn
from torch._dynamo.exc import BackendCompilerFailed, Unsupported, UserError   # noqa: F401  .inner_exception; graph-break kinds
from torch._dynamo.symbolic_convert import InstructionTranslator
from torch._export.serde import serialize as serde                 # noqa: F401  the artifact program format (JSON, no pickle)
from torch._functorch import config as functorch_config            # noqa: F401  enable_autograd_cache, force_non_lazy_backward_lowering
from torch._functorch.aot_autograd import aot_export_module        # noqa: F401  joint graph + signature (inputs_to_parameters,
#                                                                              buffers_to_mutate, backward_signature.gradients_to_parameters)
from torch._guards import detect_fake_mode                         # noqa: F401  the FakeTensorMode of a traced graph's values
from torch._inductor import config as inductor_config              # noqa: F401  layout_optimization (patched off for the step)
from torch._inductor.compile_fx import compile_fx                  # noqa: F401  config_patches={"custom_partitioner_fn": ...}
from torch._inductor.compile_fx import compile_fx_inner            # what compile_fx_with_code wraps (its inner_compile=)
from torch._inductor.dependencies import StarDep, WeakDep            # the ordering deps Inductor adds for in-place writes
from torch._inductor.graph import GraphLowering                    # save_output_code: where the wrapper is handed over
from torch._inductor.custom_graph_pass import CustomPartitionerFn  # noqa: F401  the partitioner hook the backend runs the passes in
from torch._inductor.decomposition import select_decomp_table      # noqa: F401  Inductor's decompositions, for the eager executor too
from torch._inductor.scheduler import SchedulerNode                  # recompute_size_and_body (inductor_keeps_write_order)
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode   # noqa: F401  DDPOptimizer's inputs; one fake mode for a rewritten graph
from torch.utils._ordered_set import OrderedSet                    # what Inductor's ReadWrites.with_read takes

FUNCTIONAL_LINEAR = torch._C._nn.linear      # what F.linear is bound to in graphs Dynamo captured


def program_json(exported) -> bytes:
    """torch.export's JSON of an ExportedProgram (serde.serialize(...).exported_program). torch 2.13 can skip the
    pickled sections (state dict, constants, example inputs), which are not read; 2.11 has no switch for them, so
    there they are pickled and dropped."""
    if "serialize_state_dict" in inspect.signature(serde.serialize).parameters:
        return serde.serialize(exported, serialize_state_dict=False, serialize_constants=False,
                               serialize_example_inputs=False).exported_program
    return serde.serialize(exported).exported_program


def compiling_frame() -> tuple[dict, dict] | None:
    """(f_locals, f_globals) of the frame Dynamo is compiling, None outside a compilation; relies on
    InstructionTranslator.current_tx() being set while a backend runs."""
    tx = InstructionTranslator.current_tx()
    return None if tx is None else (tx.f_locals, tx.f_globals)


def source_name(placeholder) -> str | None:
    """Dynamo's source expression of a graph input ("L['self']._modules['fc']._parameters['weight']"), from the
    placeholder's meta["grapharg"].source.name; None for inputs Dynamo recorded no source for."""
    grapharg = placeholder.meta.get("grapharg")
    return None if grapharg is None else grapharg.source.name


def memory_timeline(prof) -> list[tuple[int, object, object, int]]:
    """(time, action, key, bytes) of every allocation event a memory profile recorded; relies on
    profile._memory_profile().timeline and action.name in CREATE/DESTROY/INCREMENT_VERSION."""
    return prof._memory_profile().timeline


def functional_collectives():
    """(all_reduce, wait_tensor): the traceable functional collectives (torch.ops._c10d_functional) that
    torch.distributed._functional_collectives and DTensor use; all_reduce(t, "sum", group_name) returns a new
    tensor, valid after wait_tensor. Registered when torch is built with distributed support."""
    ops = torch.ops._c10d_functional
    return ops.all_reduce.default, ops.wait_tensor.default


def wrappers(module):
    """module, then each module it wraps under any stack of torch.compile (OptimizedModule._orig_mod) and DDP
    (.module), down to the user's own model. FSDP2's fully_shard changes a module's class in place and keeps
    its names, so it adds no level."""
    from torch.nn.parallel import DistributedDataParallel
    while True:
        yield module
        inner = module.module if isinstance(module, DistributedDataParallel) else getattr(module, "_orig_mod", module)
        if inner is module:
            return
        module = inner


def unwrapped(module):
    """The user's own model under its wrappers: the module whose parameter names update schemes use."""
    *_, own = wrappers(module)
    return own


def active_ddp():
    """The DistributedDataParallel whose forward is running (Dynamo compiles inside it, in either wrap order),
    or None; relies on DistributedDataParallel._get_active_ddp_module, which DDPOptimizer reads too."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel._get_active_ddp_module()


def ddp_ignored(param) -> bool:
    """Whether DDP leaves this parameter out (set by ddp_ignore below: param._ddp_ignored)."""
    return getattr(param, "_ddp_ignored", False)


def ddp_ignore(module, names: list[str]) -> None:
    """Make a DistributedDataParallel built on module afterwards leave these parameters out of its reducer (no
    gradient bucket, no all-reduce, no broadcast) and make Dynamo's DDPOptimizer skip them when it splits the
    graph by buckets; relies on DistributedDataParallel._set_params_and_buffers_to_ignore_for_model, the
    "ignore" list DDP reads at construction (param._ddp_ignored for DDPOptimizer)."""
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def fsdp_groups(module) -> list:
    """The FSDP2 parameter groups of a module fully_shard was applied to (one per mesh; the root's own state):
    per group, (registered parameter, full shape, shard dim) of its FSDPParams in the order FSDP2 packs their
    gradients for the reduce-scatter (foreach_reduce: each gradient's dim 0 padded to a multiple of the world
    size, cut into one chunk per rank, rank r's chunks concatenated as row r of the flat input). Relies on
    FSDPModule._get_fsdp_state()._fsdp_param_groups, FSDPParam.sharded_param (the DTensor registered as the
    module's parameter), ._orig_size and .fsdp_placement. torch 2.11's state has one group or None
    (._fsdp_param_group)."""
    state = module._get_fsdp_state()
    groups = state._fsdp_param_groups if hasattr(state, "_fsdp_param_groups") else \
        [g for g in [state._fsdp_param_group] if g is not None]
    return [[(fp.sharded_param, tuple(fp._orig_size), fp.fsdp_placement.dim) for fp in group.fsdp_params]
            for group in groups]


@contextlib.contextmanager
def inductor_keeps_write_order():
    """A context for Inductor compilations. torch 2.11's SchedulerNode.recompute_size_and_body, which the CPU
    backend's fusion calls, rebuilds a node's dependencies from its loop body and drops the ordering ones Inductor
    added for in-place writes (WeakDep: run after every earlier reader; StarDep): a kernel writing a parameter in place
    can then run before a GEMM that still reads it, a silently wrong gradient (pytorch/pytorch#177631, fixed in
    2.12 by #177816; the train step's Channels updates met it). Where the method does not keep them, it is wrapped
    to keep them as the fix does, and the FX graph cache is bypassed (it may hold a graph compiled without the
    fix); a no-op where the method keeps them (2.12, 2.13)."""
    try:
        fixed = "fake_deps" in inspect.getsource(SchedulerNode.recompute_size_and_body)
    except OSError:                         # installed without sources
        fixed = torch.__version__ >= "2.12"
    if fixed:
        yield
        return
    original = SchedulerNode.recompute_size_and_body

    def recompute_size_and_body(self, *args, **kwargs):
        kept = OrderedSet(dep for dep in self.read_writes.reads if isinstance(dep, (WeakDep, StarDep)))
        original(self, *args, **kwargs)
        if kept:
            self.set_read_writes(self.read_writes.with_read(kept).rename(self.mutation_renames))
    with mock.patch.object(SchedulerNode, "recompute_size_and_body", recompute_size_and_body), \
            inductor_config.patch(fx_graph_cache=False):
        yield


def compile_fx_with_code(gm, example_inputs):
    """(compiled fn, the Python wrapper Inductor generated for gm or None). The wrapper is the one the compiled
    step runs, read from what compile_fx_inner returns (CompiledFxGraph.source_code; also on FX-graph-cache
    hits); relies on compile_fx's inner_compile= hook."""
    codes = []

    def inner(*args, **kwargs):
        out = compile_fx_inner(*args, **kwargs)
        codes.append(getattr(out, "source_code", None))
        return out

    with inductor_keeps_write_order():
        fn = compile_fx(gm, example_inputs, inner_compile=inner)
    return fn, (codes[-1] if len(codes) == 1 else None)


class _Generated(Exception):
    pass


def inductor_wrapper_code(gm, example_inputs) -> str | None:
    """The Python wrapper Inductor generates for gm, without compiling its kernels: lowering, scheduling and
    code generation run (the FX graph cache is bypassed so that they do) and compile_fx is stopped where the
    wrapper is handed to GraphLowering.save_output_code, before its C++/Triton kernels are built. None where
    Inductor did not get that far (the caller then falls back to its own model). AOTAutograd's cache is bypassed
    too: a hit there would return a compiled graph without lowering it."""
    def stop(code):
        raise _Generated(code)

    with mock.patch.object(GraphLowering, "save_output_code", staticmethod(stop)), \
            inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False), \
            inductor_keeps_write_order():
        try:
            compile_fx(gm, example_inputs)
        except Exception as e:                  # Inductor may wrap what save_output_code raised
            while e is not None and not isinstance(e, _Generated):
                e = e.__cause__ or e.__context__
            if e is None:
                raise
            return e.args[0]
    return None
