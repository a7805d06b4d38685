"""The Dynamo backend: AOTAutograd captures the joint forward+backward graph, the pipeline rewrites it,
the min-cut partitioner splits it, and Inductor (or plain FX) runs the halves."""
from __future__ import annotations

import hashlib
import logging
import warnings

import torch
import torch.fx as fx
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition

from . import analysis, cost_model, inductor_memory, memory_budget, progress
from ._torch import (CustomPartitionerFn, FakeTensor, active_ddp, aot_autograd, compile_fx, compiling_frame,
                     ddp_ignored, functorch_config, inductor_keeps_write_order, select_decomp_table)
from .config import Channels, Config, rule_name
from .errors import ConfigError
from .distributed import fsdp_sharded
from .graph import clone_graph_module, dynamo_copy, dynamo_parameters, dynamo_root_module, output_values
from .passes import Plan
from .passes.sparsify import Rewrite, sparsify
from .memory import liveness
from .pipeline import assemble_report, readable, run_passes


class _QuietFakeTensorMetaFailure(logging.Filter):
    """PyTorch's fake tensors log a full traceback at ERROR level ("failed while attempting to run meta for
    aten.mm.default", ~20 lines) whenever an op's shape check fails while Dynamo traces, and then re-raise the
    same error, which Dynamo reports with the op and the shapes. So a model called with an input of the wrong
    size prints the traceback twice; the first copy comes from PyTorch before any sparsecc code runs. Exactly
    that record is dropped (the error itself still propagates unchanged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "failed while attempting to run meta for %s"


if not any(isinstance(f, _QuietFakeTensorMetaFailure) for f in logging.getLogger("torch._subclasses.fake_tensor").filters):
    logging.getLogger("torch._subclasses.fake_tensor").addFilter(_QuietFakeTensorMetaFailure())


class UnsupportedGraphError(RuntimeError):
    """The captured graph does not have the shape sparsecc relies on; nothing was compiled."""


class SparseccPartitioner(CustomPartitionerFn):
    """Runs the pass pipeline on the joint graph, then min-cut partitions it; records a Report."""

    def __init__(self, params: dict[int, tuple[str, torch.Tensor, object]], n_inputs: int, rewrite: Rewrite,
                 config: Config):
        # Dynamo input index -> (name, shape, rule); no tensors: Inductor's graph cache deep-copies this object
        self.params = {i: (n, tuple(p.shape), r) for i, (n, p, r) in params.items()}
        self.channels = {n: r.indices(p) for n, p, r in params.values() if isinstance(r, Channels)}
        self.n_inputs = n_inputs
        self.rewrite = rewrite        # what sparsify did to Dynamo's graph before AOTAutograd traced it
        self.budget, self.fused = config.budget_bytes, config.executor == "inductor"
        self._plans: dict[str, int | None] = {}    # budget points whose graphs are the same code: one Inductor plan

    def uuid(self):
        key = repr(sorted((i, n, shape, rule_name(r)) for i, (n, shape, r) in self.params.items()))
        key += repr(self.rewrite.result.notes) + repr(self.budget)
        return hashlib.sha256(key.encode()).hexdigest()

    def plan(self, joint: fx.GraphModule, num_fwd_outputs: int) -> Plan:
        primals = [n for n in joint.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
        if len(primals) != self.n_inputs:
            raise UnsupportedGraphError(
                f"the joint graph has {len(primals)} primal inputs but Dynamo passed {self.n_inputs}; "
                f"sparsecc cannot tell which input is which parameter")
        for i, (name, want, _) in self.params.items():
            shape = tuple(primals[i].meta["val"].shape)
            if shape != want:
                raise UnsupportedGraphError(f"joint input {i} has shape {shape}, but {name} has {want}")
        return Plan.build([(i, n, shape) for i, (n, shape, _) in self.params.items()],
                          {n: r for n, _, r in self.params.values()}, self.channels, self.rewrite.sparse_params,
                          num_fwd_outputs)

    def __call__(self, joint: fx.GraphModule, joint_inputs, **kwargs):
        plan = self.plan(joint, kwargs["num_fwd_outputs"])
        fw0, bw0 = min_cut_rematerialization_partition(clone_graph_module(joint), joint_inputs, **kwargs)
        results, graphs = run_passes(joint, plan)
        n_out = plan.num_fwd_outputs
        if self.budget is None:
            fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        else:
            (fw, bw), entry = memory_budget.fit(lambda f: self._partition(joint, joint_inputs, kwargs, f),
                                                self.budget, "this graph")
            results.append(entry)
        results.insert(0, self.rewrite.result)
        graphs = {**self.rewrite.graphs, **graphs, "forward/before": readable(fw0), "backward/before": readable(bw0),
                  "forward/after": readable(fw), "backward/after": readable(bw)}
        assemble_report(plan, results, graphs, {
            # "before" is plain autograd training every parameter with dense weights: a sparse weight's GEMMs
            # count as the dense GEMMs they replace, so the headline includes what the sparse ops save
            "backward_flops_before": analysis.graph_flops(bw0, dense=True), "backward_flops_after": analysis.graph_flops(bw),
            "forward_flops_before": analysis.graph_flops(fw0, dense=True), "forward_flops_after": analysis.graph_flops(fw),
            "saved_bytes_before": analysis.saved_bytes(fw0, n_out), "saved_bytes_after": analysis.saved_bytes(fw, n_out),
            "backward_nodes_before": len(bw0.graph.nodes), "backward_nodes_after": len(bw.graph.nodes)})
        return fw, bw

    def _partition(self, joint, joint_inputs, kwargs, fraction: float):
        """Forward and backward at one activation_memory_budget fraction, and its point of the trade-off: the
        peak is the forward's, or the tensors it saves plus the backward's, whichever is larger."""
        fw, bw = min_cut_rematerialization_partition(clone_graph_module(joint), joint_inputs, **kwargs)
        if self.fused:       # Inductor's buffer plans; the backward frees each saved activation after its last use
            kept = [n.op != "placeholder" for n in output_values(fw)[kwargs["num_fwd_outputs"]:]]
            owned = [i for i in range(sum(n.op == "placeholder" for n in bw.graph.nodes)) if i >= len(kept) or kept[i]]
            peaks = tuple(self._plans.get(g.code) or self._plans.setdefault(g.code, _planned_peak(g, o))
                          for g, o in ((fw, ()), (bw, owned)))
        if not self.fused or None in peaks:
            saved = analysis.saved_bytes(fw, kwargs["num_fwd_outputs"])
            peaks = liveness(fw, fused=self.fused).peak, saved + liveness(bw, fused=self.fused).peak
        peak = max(peaks)
        return (fw, bw), memory_budget.point(fraction, peak, fw, bw)


def _planned_peak(gm: fx.GraphModule, owned=()) -> int | None:
    """gm's peak in the buffer plan of the wrapper Inductor generates for it on gm's own (fake) inputs, its kernels
    not compiled; None where that wrapper cannot be followed."""
    planned = inductor_memory.plan(gm, [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"], owned)
    return planned.peak if planned else None


def _refuse_unreachable_fsdp(found: dict) -> None:
    """FSDP2 with fully_shard on submodules: Dynamo breaks the graph at FSDP's hooks and the graphs it compiles
    read the unsharded parameters as plain tensors, so the scheme would not reach them and the model would
    train in full. Such a graph (FSDP modules in its frame, no parameter among its inputs) is refused."""
    frame = compiling_frame()
    if found or frame is None:
        return
    sharded = sorted({n for v in frame[0].values() if isinstance(v, torch.nn.Module) for n in fsdp_sharded(v)})
    if sharded:
        raise ConfigError(
            f"backend='sparsecc' cannot apply the update scheme through FSDP2 fully_shard on submodules (this "
            f"graph runs {', '.join(sharded)} and receives none of its parameters: Dynamo splits the graph at "
            f"FSDP's hooks, so the model would train in full). Shard only the root module "
            f"(sparsecc.fully_shard(model, scheme) does, and sends only the trained elements), train data-parallel "
            f"with sparsecc.compile_train_step(..., process_group=...), or freeze with requires_grad_(False) "
            f"under FSDP2")


def _refuse_ddp_reducing_frozen(params: dict, rules: dict) -> None:
    """Under a DistributedDataParallel built by hand, DDP all-reduces the frozen parameters' gradients too and
    fills their .grad with zeros (weight decay would then change them): refused, with the fix."""
    ddp = active_ddp()
    if ddp is None:
        return
    reduced = [n for n, p in params.items() if rules.get(n) == "frozen" and p.requires_grad and not ddp_ignored(p)]
    if reduced:
        raise ConfigError(
            f"this DistributedDataParallel would all-reduce the gradients of {len(reduced)} frozen parameters "
            f"({', '.join(reduced[:3])}{', ...' if len(reduced) > 3 else ''}) and give them zero .grad, which "
            f"weight decay then applies; build it with sparsecc.data_parallel(model, scheme, **ddp_kwargs), "
            f"which leaves them out and communicates only the trained elements")


def _same(param, value) -> bool:
    """Whether a graph input is this parameter: the parameter itself, or (when Dynamo's DDPOptimizer compiles
    the graph split by DDP's buckets, on fake inputs) a fake tensor of its shape and dtype."""
    return param is value or (param is not None and isinstance(value, FakeTensor)
                              and (value.shape, value.dtype) == (param.shape, param.dtype))


def _boxed(gm, example_inputs):
    return make_boxed_func(gm.forward)


def compile_graph(gm: fx.GraphModule, example_inputs, config: Config):
    """Compile one Dynamo graph under config. Returns the compiled callable."""
    found = dynamo_parameters(gm, example_inputs)
    _refuse_unreachable_fsdp(found)
    root = dynamo_root_module(gm)
    params = dict(root.named_parameters(remove_duplicate=False)) if root is not None else {}
    complete = bool(params) and all(_same(params.get(n), p) for n, p in found.values())
    if not complete:
        warnings.warn("sparsecc: could not find the one module this graph's parameters belong to; the update "
                      "scheme is applied to the graph's own parameters without checking that every pattern matches")
        params = {name: p for name, p in found.values()}
    rules = config.scheme.resolve(params, complete=complete)
    _refuse_ddp_reducing_frozen(params, rules)
    before, gm = readable(gm), dynamo_copy(gm)    # Dynamo reads its own graph again after we return
    # the cost model measures on the parameters' device (their N:M patterns tell it which kernels those run)
    device = next((p.device for _, p in found.values()), None)
    with cost_model.compiling(device, cost_model.nm_patterns(getattr(root, "sparsecc_patterns", {}), params)):
        rewrite = sparsify(gm, list(example_inputs), {i: (n, p) for i, (n, p) in found.items()},
                           root if complete else None, config)
    if rewrite.extra_inputs:
        rewrite.graphs = {"dynamo/input": before, "dynamo/after sparsify": readable(gm)}
    inputs = list(example_inputs) + rewrite.extra_inputs
    # the real parameters (Channels(select="magnitude") reads their values), also where Dynamo passed fakes
    partitioner = SparseccPartitioner({i: (n, params.get(n, p), rules[n]) for i, (n, p) in found.items()},
                                      len(inputs), rewrite, config)
    what = "Inductor: usually 10-90 s" if config.executor == "inductor" else "eager executor"
    name = type(root).__name__ if root is not None else "graph"
    # the backward is compiled now, not at the first .backward() (AOTAutograd's default): the whole wait happens
    # here, under one progress line, and a backward that cannot compile fails at the call that compiled it
    with functorch_config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True), \
            progress.waiting(f"compiling {name} for training ({what}, once per input shape)"):
        if config.executor == "inductor":
            with inductor_keeps_write_order():
                compiled = compile_fx(gm, inputs, config_patches={"custom_partitioner_fn": partitioner})
        else:
            compiled = aot_autograd(fw_compiler=_boxed, bw_compiler=_boxed, partition_fn=partitioner,
                                    decompositions=select_decomp_table(),
                                    keep_inference_input_mutations=True)(gm, inputs)
    return with_sparse_inputs(compiled, rewrite) if rewrite.extra_inputs else compiled


def with_sparse_inputs(compiled, rewrite: Rewrite):
    """The compiled graph called with the sparse weights' compressed operands appended to Dynamo's inputs.
    A mask picked up from a buffer is checked whenever that buffer changes: entries outside the compiled
    support would need a recompilation, so they are an error, never a silently wrong number."""
    extra = rewrite.extra_inputs
    seen = {pos: (None, -1) for pos in rewrite.picked_masks}

    def check(args):
        for pos, sw in rewrite.picked_masks.items():
            mask = args[pos]
            if seen[pos] != (id(mask), mask._version):
                if ((mask != 0) & ~sw.support).any():
                    raise RuntimeError(f"sparsecc: the mask of {sw.name!r} now keeps entries outside the sparsity "
                                       f"it was compiled for; call torch._dynamo.reset() and compile again")
                seen[pos] = (id(mask), mask._version)

    def run(*args):
        check(args)
        return compiled(*args, *extra)
    return run


def sparsecc_backend(gm: fx.GraphModule, example_inputs, options=None):
    """The function registered as torch.compile(backend="sparsecc"); options are Config's fields."""
    return compile_graph(gm, example_inputs, Config.from_options(options))


def backend_for(config: Config):
    """A backend callable that compiles every graph under config."""
    def sparsecc(gm, example_inputs):
        return compile_graph(gm, example_inputs, config)

    sparsecc.config = config
    return sparsecc


def backend(**options):
    """sparsecc.backend(update=..., executor=...) -> a backend callable for torch.compile(backend=...).
    Options are validated now, so a bad one fails before anything is compiled."""
    return backend_for(Config.from_options(options))

