"""The Dynamo backend: AOTAutograd captures the joint forward+backward graph, the pipeline rewrites it,
the min-cut partitioner splits it, and Inductor (or plain FX) runs the halves."""
from __future__ import annotations

import hashlib
import warnings

import torch
import torch.fx as fx
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from . import analysis
from .config import Channels, Config, rule_name
from .graph import clone_graph_module, dynamo_parameters, dynamo_root_module
from .passes import ParamPlan, Plan
from .pipeline import readable, run_passes, totals
from .report import Report, register

class UnsupportedGraphError(RuntimeError):
    """The captured graph does not have the shape sparsecc relies on; nothing was compiled."""


class SparseccPartitioner(CustomPartitionerFn):
    """Runs the pass pipeline on the joint graph, then min-cut partitions it; records a Report."""

    def __init__(self, params: dict[int, tuple[str, torch.Tensor, object]], n_inputs: int):
        self.params = params          # Dynamo input index -> (name, parameter, rule)
        self.indices = {i: r.indices(p) for i, (_, p, r) in params.items() if isinstance(r, Channels)}
        self.n_inputs = n_inputs

    def uuid(self):
        key = repr(sorted((i, n, tuple(p.shape), rule_name(r)) for i, (n, p, r) in self.params.items()))
        return hashlib.sha256(key.encode()).hexdigest()

    def plan(self, joint: fx.GraphModule, num_fwd_outputs: int) -> Plan:
        primals = [n for n in joint.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
        if len(primals) != self.n_inputs:
            raise UnsupportedGraphError(
                f"the joint graph has {len(primals)} primal inputs but Dynamo passed {self.n_inputs}; "
                f"sparsecc cannot tell which input is which parameter")
        plans = []
        for i, (name, param, rule) in self.params.items():
            shape = tuple(primals[i].meta["val"].shape)
            if shape != tuple(param.shape):
                raise UnsupportedGraphError(f"joint input {i} has shape {shape}, but {name} has {tuple(param.shape)}")
            plans.append(ParamPlan(name, i, rule, shape, self.indices.get(i)))
        return Plan(tuple(plans), num_fwd_outputs)

    def __call__(self, joint: fx.GraphModule, joint_inputs, **kwargs):
        plan = self.plan(joint, kwargs["num_fwd_outputs"])
        fw0, bw0 = min_cut_rematerialization_partition(clone_graph_module(joint), joint_inputs, **kwargs)
        results, graphs = run_passes(joint, plan)
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        n_out = plan.num_fwd_outputs
        report = Report(graphs=graphs, passes=results,
                        params=[(p.name, rule_name(p.rule), p.shape) for p in plan.params])
        report.graphs.update({"forward/before": readable(fw0), "backward/before": readable(bw0),
                              "forward/after": readable(fw), "backward/after": readable(bw)})
        report.stats = {
            "backward_flops_before": analysis.graph_flops(bw0), "backward_flops_after": analysis.graph_flops(bw),
            "saved_bytes_before": analysis.saved_bytes(fw0, n_out), "saved_bytes_after": analysis.saved_bytes(fw, n_out),
            "backward_nodes_before": len(bw0.graph.nodes), "backward_nodes_after": len(bw.graph.nodes),
            **totals(results, "grads_pruned", "grads_sliced", "nodes_removed"),
        }
        register(report)
        return fw, bw


def _boxed(gm, example_inputs):
    return make_boxed_func(gm.forward)


def compile_graph(gm: fx.GraphModule, example_inputs, config: Config):
    """Compile one Dynamo graph under config. Returns the compiled callable."""
    found = dynamo_parameters(gm, example_inputs)
    root = dynamo_root_module(gm)
    params = dict(root.named_parameters(remove_duplicate=False)) if root is not None else {}
    complete = bool(params) and all(params.get(n) is p for n, p in found.values())
    if not complete:
        warnings.warn("sparsecc: could not find the one module this graph's parameters belong to; the update "
                      "scheme is applied to the graph's own parameters without checking that every pattern matches")
        params = {name: p for name, p in found.values()}
    rules = config.scheme.resolve(params, complete=complete)
    partitioner = SparseccPartitioner({i: (n, p, rules[n]) for i, (n, p) in found.items()}, len(example_inputs))
    with torch._functorch.config.patch(enable_autograd_cache=False):
        if config.executor == "inductor":
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs, config_patches={"custom_partitioner_fn": partitioner})
        from torch._inductor.decomposition import select_decomp_table
        return aot_autograd(fw_compiler=_boxed, bw_compiler=_boxed, partition_fn=partitioner,
                            decompositions=select_decomp_table(), keep_inference_input_mutations=True)(gm, example_inputs)


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

