"""compile_train_step: forward, loss, backward and optimizer update as one compiled graph.

The whole step is exported as one joint graph (torch._functorch's aot_export_module, all parameters
as inputs), the training pipeline rewrites it, and the result runs on parameters, buffers, batch, lr,
step count and optimizer state; it updates parameters and state in place and returns the loss and the
new buffers (copied back here). Nothing outside the scheme is ever written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.parallel import DistributedDataParallel

from . import analysis, cost_model, inductor_memory, memory, memory_budget, progress
from ._torch import (FakeTensorMode, aot_export_module, compile_fx_with_code, core_aten_decompositions,
                     inductor_config, select_decomp_table, unwrapped, wrappers)
from .calling import MASK_PREFIX, Structure, call_model, first_alias, flatten, leaf_names, model_loss
from .capture import capture
from .ops import linear_cross_entropy, swiglu
from .config import Channels, Config
from .distributed import fsdp_sharded
from .graph import call, clone_graph_module, output_values, set_output_values
from .optim import AdamW, SGD
from .errors import ConfigError, human
from .passes import Plan
from .passes.sparsify import sparsify_step
from .pipeline import (CAPTURE_PASSES, DATA_PARALLEL_STEP_PASSES, HOST_ONLY_PASSES, TRAIN_STEP_PASSES,
                       assemble_report, readable, run_passes)
from .report import Report


# sparsecc ops that exported programs carry as ATen ops (their runtimes know no sparsecc:: op)
PORTABLE = {torch.ops.sparsecc.linear_cross_entropy.default: linear_cross_entropy.chunked}


class _LossModule(torch.nn.Module):
    """loss_fn(model(x), y) over a flat list of tensors, as aot_export_module wants it. A sparse weight is
    read as weight * mask (the mask a buffer of this module), so its pruned entries get zero gradient."""

    def __init__(self, model, loss_fn, structure: Structure, masks: dict[str, torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn, self.structure = model, loss_fn, structure
        self.masked = {}
        for i, (name, mask) in enumerate(masks.items()):
            self.register_buffer(f"{MASK_PREFIX}{i}", mask)
            self.masked[name] = f"{MASK_PREFIX}{i}"

    def forward(self, *tensors):
        x, y = self.structure.unflatten(tensors)
        if self.masked:
            params = dict(self.model.named_parameters(remove_duplicate=False))
            out = call_model(self.model, x, {n: params[n] * getattr(self, b) for n, b in self.masked.items()})
        else:                                                                  # tied names follow
            out = call_model(self.model, x)
        return (model_loss(out) if self.loss_fn is None else self.loss_fn(out, y),)


def _check_loss(captured: fx.GraphModule, loss_fn) -> None:
    """The captured step must return one floating-point scalar: the loss."""
    (value,) = [getattr(n, "meta", {}).get("val") for n in captured.graph.output_node().args[0]]
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        what = "the model's own loss (loss_fn=None: output.loss, or output[0])" if loss_fn is None else "loss_fn"
        fix = ("pass labels= in the inputs so that the model computes its loss, or pass a loss_fn"
               if loss_fn is None else "reduce it, e.g. with .mean()")
        raise ConfigError(f"{what} must be a floating-point scalar tensor, got {got}; {fix}")


def _merge_tied(joint: fx.GraphModule, first: list[int], grads: list) -> list:
    """Tied weights come out of export as one input per name, each with its share of the gradient.
    Route every use to the first name's input and give it the summed gradient; the other names get none."""
    placeholders = joint.graph.find_nodes(op="placeholder")
    for i, j in enumerate(first):
        if i == j:
            continue
        placeholders[i].replace_all_uses_with(placeholders[j])
        if grads[i] is not None:
            with joint.graph.inserting_before(joint.graph.output_node()):
                grads[j] = grads[i] if grads[j] is None else \
                    call(joint.graph, torch.ops.aten.add.Tensor, (grads[j], grads[i]), "export")
            grads[i] = None
    return grads


def _signature(leaves) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in leaves)


@dataclass(frozen=True)
class StepInputs:
    """Which tensors an exported step graph reads and writes, by name (each export has its own: a sparse
    rewrite adds its index buffers)."""
    params: list[str]                # parameter inputs, in order
    buffers: list[str]               # buffer inputs, in order
    mutated: list[str]               # buffers whose new values lead the outputs
    operands: dict[str, tuple[str, str]]   # buffers that are a sparse kernel's operands -> (weight, operand)


@dataclass
class _Compiled:
    fn: object                       # the compiled graph, called on the flat input list
    graph: fx.GraphModule            # the training-step graph the passes produced (what fn runs)
    updates: list[tuple[str, tuple]]  # (parameter name, trained shape) per update, in state-input order
    report: Report
    io: StepInputs


def inductor_settings(gm: fx.GraphModule):
    """How Inductor compiles the step gm. Its channels-last layout optimisation copies every conv activation of a
    whole-step graph: measured on the conv net of bench_train_step, off is 1.5x less memory and 1.2x faster. Its own
    peak-memory reordering (reorder_for_peak_memory, where this torch has it) is off for a step whose SwiGLU backward
    is written in place (swiglu_backward_in_place): with those in-place ops its reordering raised the peak it
    otherwise lowers (bench_llm_memory, Inductor's plan = measured: full fine-tuning 217.54 -> 245.71 MB with it,
    217.54 without; the sparse-update step 137.57 with it, 120.56 without; the 6.7 B GPU plan 533.0 -> 514.3 MiB),
    while on steps without them it helps (bench_train_step's GPT: 42.03 MB with it, 52.99 without)."""
    settings = {"layout_optimization": False}
    if hasattr(inductor_config, "reorder_for_peak_memory") and \
            any(n.target in swiglu.IN_PLACE_OPS for n in gm.graph.nodes if n.op == "call_function"):
        settings["reorder_for_peak_memory"] = False
    return inductor_config.patch(settings)


class TrainStep:
    """A compiled training step. step(x, y) trains in place and returns the loss."""

    def __init__(self, model, loss_fn, optimizer, config: Config, rules: dict, example_inputs, comm=None):
        self.model, self.loss_fn, self.optimizer, self.config, self.rules = model, loss_fn, optimizer, config, rules
        self.comm = comm            # (process group name, world size, bucket bytes) of a data-parallel step
        self._passes = TRAIN_STEP_PASSES if comm is None else DATA_PARALLEL_STEP_PASSES
        self.params = dict(model.named_parameters(remove_duplicate=False))   # tied weights under every name
        self.masks = {n: m.to(self.params[n].device) for n, m in getattr(model, "sparsecc_masks", {}).items()}
        self.buffers = {**dict(model.named_buffers()),
                        **{f"{MASK_PREFIX}{i}": m for i, m in enumerate(self.masks.values())}}
        self.indices = {n: r.indices(self.params[n]) for n, r in rules.items()
                        if isinstance(r, Channels) and n in self.params}
        device = self._device = next(iter(self.params.values())).device
        # float64 like the Python floats torch.optim computes its step sizes and bias corrections in
        self._lr = torch.tensor(float(optimizer.lr), dtype=torch.float64, device=device)
        self._step = torch.tensor(0.0, dtype=torch.float64, device=device)
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._compiled: dict[tuple, _Compiled] = {}
        self._captures: dict[tuple, fx.GraphModule] = {}     # Dynamo's capture per batch signature, before any pass
        self.compilations = 0
        self.example_inputs = example_inputs
        self._get(*example_inputs)

    # ---- compilation -------------------------------------------------------------------------------
    def _get(self, x, y) -> tuple[_Compiled, list[torch.Tensor]]:
        leaves, structure = flatten((x, y))
        key = (structure, _signature(leaves))
        if key not in self._compiled:
            what = f"{type(self.model).__name__}'s training step ({self.config.executor}, once per input shape)"
            with progress.waiting(f"compiling {what}"):
                try:
                    self._compiled[key] = self._compile(leaves, structure)
                except ConfigError:
                    raise
                except Exception as e:        # a batch unlike the first: say how, then what failed
                    if not self._compiled:
                        raise
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise ConfigError(f"{self._difference(x, y, leaves, structure)}; compiling the step for this batch "
                                      f"failed ({type(e).__name__}: {first})") from e
            self.compilations += 1
        self._last = self._compiled[key]
        return self._last, leaves

    def _difference(self, x, y, leaves, structure) -> str:
        """How a batch differs from the example the step was first compiled for."""
        ex_leaves, ex_structure = flatten(self.example_inputs)
        if structure != ex_structure:
            return (f"the batch is structured as {structure.spec} with constants {structure.constants_json()}, "
                    f"the step was compiled for {ex_structure.spec} with {ex_structure.constants_json()}")
        for name, got, want in zip(leaf_names((x, y)), leaves, ex_leaves):
            if (got.shape, got.dtype) != (want.shape, want.dtype):
                return (f"{name} is {str(got.dtype).removeprefix('torch.')} {list(got.shape)}, the step was "
                        f"compiled for {str(want.dtype).removeprefix('torch.')} {list(want.shape)}")
        return "the batch differs from the one the step was compiled for"

    def _export(self, leaves, structure: Structure, decompositions=None, seconds: dict | None = None,
                sparse_kernels: bool = True) -> tuple[fx.GraphModule, Plan]:
        wrapper = _LossModule(self.model, self.loss_fn, structure, self.masks)
        saved = {p: p.requires_grad for p in self.params.values()}
        seconds = {} if seconds is None else seconds
        sparse, operands = set(), {}            # what the sparse rewrite did (nothing without one)
        try:
            for p in self.params.values():
                p.requires_grad_(True)     # export full backprop; prune_backward decides what stays
            with torch.enable_grad():      # a recompile can start inside the no_grad step
                start = time.perf_counter()
                captured = self._capture(wrapper, leaves, structure)
                _check_loss(captured, self.loss_fn)
                captured_passes = [fn(captured, self._trained) for fn in (CAPTURE_PASSES if self.config.fuse_loss else ())]
                if wrapper.masked and sparse_kernels:
                    with cost_model.compiling(self._device, cost_model.nm_patterns(self.model.sparsecc_patterns,
                                                                                   self.params)):
                        rewrite = sparsify_step(captured, self.model, wrapper.masked, self.config)
                    captured_passes.append(rewrite.result)
                    sparse, operands = rewrite.sparse_params, rewrite.operands
                for name, value in captured.named_buffers():        # and the trace's own constants
                    self.buffers.setdefault(name.removeprefix("model."), value)
                seconds["capture"] = time.perf_counter() - start
                joint, sig = aot_export_module(captured, leaves, trace_joint=True, output_loss_index=0,
                                               decompositions=decompositions or select_decomp_table())
                seconds["joint"] = time.perf_counter() - start - seconds["capture"]
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)
        mode = FakeTensorMode()       # one fake mode for every node, as the passes expect
        inputs = [self.params[n.removeprefix("model.")] for n in sig.parameters]
        inputs += [self.buffers[n.removeprefix("model.")] for n in sig.buffers] + list(leaves)
        FakeTensorProp(joint, mode).propagate(*[mode.from_tensor(t.detach()) for t in inputs])
        outs = output_values(joint)
        n_fwd = len(sig.buffers_to_mutate) + len(sig.user_outputs)
        by_name = {n.name: n for n in outs[n_fwd:]}
        grad_of = {param: by_name[node] for node, param in sig.backward_signature.gradients_to_parameters.items()}
        names = [name.removeprefix("model.") for name in sig.parameters]
        first = first_alias(names, self.params)
        grads = _merge_tied(joint, first, [grad_of.get(f"model.{n}") for n in names])
        set_output_values(joint, outs[:n_fwd] + grads)
        rules = {n: self.rules[n] for i, n in enumerate(names) if i == first[i]}    # tied: first name trains
        plan = Plan.build([(i, n, self.params[n].shape) for i, n in enumerate(names)], rules, self.indices,
                          sparse, n_fwd, self.optimizer, self.comm)
        joint.meta["sparsecc_io"] = StepInputs(names, [b.removeprefix("model.") for b in sig.buffers],
                                               [b.removeprefix("model.") for b in sig.buffers_to_mutate.values()],
                                               operands)
        joint.meta["sparsecc_capture_passes"] = captured_passes
        return joint, plan

    def _capture(self, wrapper, leaves, structure: Structure) -> fx.GraphModule:
        """The step's forward and loss as Dynamo captures them, once per batch signature (compiling, portable_graph
        and joint_graph trace the same program; the attention backend is chosen later, by the joint trace): a copy
        each time, since the passes after it rewrite theirs in place."""
        key = (structure, _signature(leaves))
        if key not in self._captures:
            self._captures[key] = capture(wrapper, leaves)
        return clone_graph_module(self._captures[key])

    def _trained(self, node: fx.Node) -> bool:
        """Whether a node of the captured graph reads a parameter the scheme trains."""
        return node.op == "get_attr" and self.rules.get(node.target.removeprefix("model."), "frozen") != "frozen"

    def joint_graph(self, x, y) -> tuple[fx.GraphModule, Plan]:
        """The exported joint forward+backward graph for batches shaped like (x, y), before the training
        passes, and the plan they take (search_scheme re-runs the passes on copies of it per scheme)."""
        return self._export(*flatten((x, y)))

    def portable_graph(self, x, y, *, sparse_kernels: bool = False) -> tuple[fx.GraphModule, list[torch.Tensor]]:
        """The training-step graph for batches shaped like (x, y), with attention traced as matmul/softmax
        instead of fused CPU kernels, which exporters to other runtimes cannot lower; and the flat batch.
        Sparse weights are read as weight * mask, or with sparse_kernels=True through the sparsecc:: sparse
        ops where the step's cost model picks them (runtimes that have sparsecc: the host). It takes the same
        inputs as the compiled step (see _inputs; the names in graph.meta["sparsecc_io"])."""
        _, leaves = self._get(x, y)                # compiles (and creates the optimizer state) if needed
        with sdpa_kernel([SDPBackend.MATH]):       # and core ATen: no Inductor-only prims such as fma
            joint, plan = self._export(leaves, flatten((x, y))[1], {**core_aten_decompositions(), **PORTABLE},
                                       sparse_kernels=sparse_kernels)
        passes = [p for p in self._passes if p not in HOST_ONLY_PASSES]
        joint, _, _ = self._run_passes(joint, plan, lambda gm: memory.liveness(gm).peak, passes)   # run op by op
        return joint, leaves

    def _compile(self, leaves, structure: Structure) -> _Compiled:
        seconds = {}
        joint, plan = self._export(leaves, structure, seconds=seconds)
        before = analysis.split_flops(joint, plan.num_fwd_outputs)
        capture_passes = joint.meta["sparsecc_capture_passes"]
        peaks: dict[str, int] = {}       # budget points whose graphs are the same code share one Inductor plan
        joint, results, graphs = self._run_passes(
            joint, plan, lambda gm: peaks.get(gm.code) or peaks.setdefault(gm.code, self._modelled_peak(gm, leaves)))
        results[:0] = capture_passes
        updates = joint.meta["sparsecc_updates"]
        after = analysis.split_flops(joint, plan.num_fwd_outputs)
        seconds["passes"] = sum(r.seconds for r in results)
        example = self._example(joint, leaves)
        start = time.perf_counter()
        timeline = None
        if self.config.executor == "inductor":
            with torch.no_grad(), inductor_settings(joint):
                fn, code = compile_fx_with_code(joint, example)
            timeline = code and inductor_memory.timeline(code, example)
        else:
            fn = joint.forward
        seconds["codegen"] = time.perf_counter() - start
        timeline = timeline or memory.liveness(joint, fused=self.config.executor == "inductor")
        report = assemble_report(plan, results, {**graphs, "train_step/final": readable(joint)}, {
            "backward_flops_before": before[1], "backward_flops_after": after[1],
            "forward_flops": after[0], "peak_bytes_estimate": timeline.peak}, timeline)
        report.stats.update({f"seconds_{k}": round(v, 3) for k, v in seconds.items()})
        return _Compiled(fn, joint, updates, report, joint.meta["sparsecc_io"])

    def _example(self, gm: fx.GraphModule, leaves) -> list[torch.Tensor]:
        """The inputs gm is called with (optimizer state created for its updates where there is none yet)."""
        for name, shape in gm.meta["sparsecc_updates"]:
            self.state.setdefault(name, {s: torch.zeros(shape, dtype=self.params[name].dtype,
                                                        device=self.params[name].device)
                                         for s in self.optimizer.state_names})
        return self._inputs(gm.meta["sparsecc_io"], leaves, gm.meta["sparsecc_updates"])

    def _modelled_peak(self, gm: fx.GraphModule, leaves) -> int:
        """The step's peak: for Inductor, from the buffer plan of the wrapper it generates for gm, called on the
        step's own inputs (which of them are one tensor changes the plan) without compiling its kernels; where
        that wrapper cannot be followed, and for the eager executor, memory.liveness."""
        inductor = self.config.executor == "inductor"
        if inductor:
            with torch.no_grad(), inductor_settings(gm):
                planned = inductor_memory.plan(gm, self._example(gm, leaves))
            if planned:
                return planned.peak
        return memory.liveness(gm, fused=inductor).peak

    def _run_passes(self, joint: fx.GraphModule, plan: Plan, peak, passes=None) -> tuple[fx.GraphModule, list, dict]:
        """The training passes (default: the step's) on joint; under a memory budget, on copies of it at the least
        recomputation whose peak(graph) fits (memory_budget.py), recorded as a "memory_budget" entry of the report."""
        budget, passes = self.config.budget_bytes, passes or self._passes
        if budget is None:
            results, graphs = run_passes(joint, plan, passes)
            return joint, results, graphs

        def evaluate(fraction):
            gm = clone_graph_module(joint)
            gm.meta.update(joint.meta)
            results, graphs = run_passes(gm, plan, passes)
            return (gm, results, graphs), memory_budget.point(fraction, peak(gm), gm)
        start = time.perf_counter()
        with progress.waiting(f"fitting the step into memory_budget={human(budget)}"):
            (gm, results, graphs), entry = memory_budget.fit(evaluate, budget, "this step")
        entry.seconds = time.perf_counter() - start
        return gm, results + [entry], graphs

    # ---- running -----------------------------------------------------------------------------------
    def _inputs(self, io: StepInputs, leaves, updates) -> list[torch.Tensor]:
        args = [self.params[n].detach() for n in io.params]
        args += [self.buffers[n] for n in io.buffers]
        args += [*leaves, self._lr, self._step]
        args += [self.state[name][s] for name, _ in updates for s in self.optimizer.state_names]
        return args

    @torch.no_grad()
    def __call__(self, x, y=None) -> torch.Tensor:
        compiled, leaves = self._get(x, y)
        self._step += 1
        outs = compiled.fn(*self._inputs(compiled.io, leaves, compiled.updates))
        n_mut = len(compiled.io.mutated)
        for name, value in zip(compiled.io.mutated, outs[:n_mut]):
            self.buffers[name].copy_(value)
        return outs[n_mut]        # parameters and optimizer state were updated in place by the graph

    @property
    def graph(self) -> fx.GraphModule:
        """The training-step graph the most recent call ran."""
        return self._last.graph

    @property
    def report(self) -> Report:
        """The report of the compilation the most recent call ran."""
        return self._last.report

    def set_lr(self, lr: float) -> None:
        """Change the learning rate; the graph reads it as an input, so nothing recompiles."""
        self.optimizer = type(self.optimizer)(**{**self.optimizer.__dict__, "lr": lr})   # validates
        self._lr.fill_(float(lr))

    def measure_memory(self, x, y=None) -> int:
        """Run one real training step and return its measured peak bytes above what was live before;
        also recorded in the report as stats['peak_bytes_measured']."""
        peak = memory.measure_peak(lambda: self(x, y))
        self.report.stats["peak_bytes_measured"] = peak
        return peak

    def state_dict(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": {f"{n}/{s}": t.clone() for n, st in self.state.items() for s, t in st.items()},
                "channels": {n: i.clone() for n, i in self.indices.items() if i is not None},
                "step": int(self._step.item()), "lr": float(self._lr.item())}

    def load_state_dict(self, state: dict) -> None:
        own = self.state_dict()
        for section in ("model", "optimizer"):
            missing = set(own[section]) ^ set(state.get(section, {}))
            if missing:
                raise ConfigError(f"state_dict {section} keys differ: {sorted(missing)[:5]}")
            for k, v in state[section].items():
                if tuple(v.shape) != tuple(own[section][k].shape):
                    raise ConfigError(f"state_dict {section} entry {k!r} has shape {tuple(v.shape)}, "
                                      f"expected {tuple(own[section][k].shape)}")
        channels = state.get("channels", {})
        if set(channels) != set(own["channels"]):
            raise ConfigError(f"state_dict channels are for {sorted(channels)}, this step selects {sorted(own['channels'])}")
        if any(not torch.equal(v, own["channels"][n]) for n, v in channels.items()):
            self.indices.update({n: v.clone() for n, v in channels.items()})
            self._compiled.clear()      # the chosen channels are constants of the graph: recompile on next call
        self.model.load_state_dict(state["model"])
        for key, v in state["optimizer"].items():
            name, s = key.split("/")
            self.state[name][s] = v.clone()
        self._step.fill_(float(state["step"]))
        self.set_lr(state["lr"])


def compile_train_step(model, loss_fn, *, optimizer, update=None, example_inputs, executor="inductor",
                       fuse_loss=True, cost_model="measure", memory_budget=None, process_group=None,
                       bucket_cap_mb=25) -> TrainStep:
    """Compile forward + loss + backward + optimizer update of model into one step.

    loss_fn(model_output, y) must return a scalar tensor; loss_fn=None takes the loss the model computes
    itself (a `transformers` model given `labels=`: output.loss). example_inputs is (x, y), or (x,) for a
    step called as step(x); x is a tensor, a tuple of positional inputs or a dict of keyword inputs.

    A model sparsified with sparsecc.sparsify trains on the sparse kernels: each linear / 1x1-convolution call
    on a sparse weight runs the sparse op where the cost model measures it faster on this device
    (cost_model="measure"), everywhere (cost_model="off") or nowhere (cost_model="dense"); every other use
    reads the weight masked (weight * mask).

    memory_budget (bytes, or a string such as "40MB"): the most the step may allocate above the resident
    parameters, optimizer state and batch (report stats peak_bytes_estimate): for Inductor, as the buffer plan
    of the wrapper Inductor generates for the step (each point tried is lowered by Inductor, its kernels not
    compiled: sparsecc/inductor_memory.py), for the eager executor as memory.liveness counts it.
    The backward then recomputes just enough of the forward, instead of keeping it, to fit; the report's
    "memory_budget" entry lists the trade-off points tried. A budget below the lowest reachable peak is a
    ConfigError that states that floor.

    process_group (a torch.distributed group, e.g. torch.distributed.group.WORLD): a data-parallel step. Every
    rank calls it on its own batch (the same size everywhere); the trained gradients — k channels of a Channels
    weight, nothing of a frozen parameter — are averaged over the group inside the graph, in buckets of
    bucket_cap_mb issued while backward goes on, before the optimizer update. The step returns the rank's
    own loss. Such a step cannot be saved as an artifact (artifacts are single-process). model may come wrapped:
    DDP(model) makes the step data-parallel over DDP's process group with DDP's bucket size (unless
    process_group= is given), torch.compile(model) is unwrapped; update patterns name the model's own
    parameters either way (no "module." or "_orig_mod." prefix)."""
    if not isinstance(optimizer, (SGD, AdamW)):
        cls = optimizer if isinstance(optimizer, type) else type(optimizer)
        name = f"torch.optim.{cls.__name__}" if cls.__module__.startswith("torch.optim") else cls.__name__
        raise ConfigError(f"optimizer must be sparsecc.SGD or sparsecc.AdamW (the update is compiled into the "
                          f"step), got {name}; e.g. optimizer=sparsecc.AdamW(lr=1e-3)")
    if not (isinstance(example_inputs, (tuple, list)) and len(example_inputs) in (1, 2)):
        raise ConfigError("example_inputs must be (x, y), the model's input(s) and the loss target, or (x,) "
                          "when there is no target (loss_fn=None: the model computes its own loss)")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a function (model output, y) -> scalar tensor, or None for the "
                          f"model's own loss; got {type(loss_fn).__name__}")
    config = Config(update=update, executor=executor, fuse_loss=fuse_loss, cost_model=cost_model,
                    memory_budget=memory_budget)
    model, process_group, bucket_cap_mb = _own_model(model, process_group, bucket_cap_mb)
    comm = _data_parallel(process_group, bucket_cap_mb)
    rules = config.scheme.resolve(dict(model.named_parameters(remove_duplicate=False)))
    x, y = (*example_inputs, None)[:2]
    return TrainStep(model, loss_fn, optimizer, config, rules, (x, y), comm)


def _own_model(model, group, bucket_cap_mb):
    """(the user's model under torch.compile / DDP wrappers, process group, bucket size): a DDP wrapper makes
    the step data-parallel over DDP's group with DDP's bucket size, unless process_group= says otherwise.
    An FSDP2-sharded model holds shards, not the parameters the step updates in place: refused."""
    ddp = next((m for m in wrappers(model) if isinstance(m, DistributedDataParallel)), None)
    if ddp is not None and group is None:
        group, bucket_cap_mb = ddp.process_group, ddp.bucket_bytes_cap / 2 ** 20
    model = unwrapped(model)
    sharded = fsdp_sharded(model)
    if sharded:
        raise ConfigError(f"compile_train_step cannot train an FSDP2-sharded model ({', '.join(sharded)} hold "
                          f"parameter shards): pass the unsharded model with process_group=..., which averages "
                          f"only the trained gradients over the group, or torch.compile(model, backend='sparsecc') "
                          f"sharded on the root module only: sparsecc.fully_shard(model, scheme)")
    return model, group, bucket_cap_mb


def _data_parallel(group, bucket_cap_mb) -> tuple | None:
    """(group name, world size, bucket bytes) for a process group, None without one; ConfigError when unusable."""
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
        raise ConfigError(f"bucket_cap_mb must be a number > 0 (megabytes per all-reduce bucket), got {bucket_cap_mb!r}")
    if group is None:
        return None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("process_group= needs torch.distributed initialised first (dist.init_process_group(...) "
                          "on every rank, e.g. under torchrun)")
    if not isinstance(group, dist.ProcessGroup):
        raise ConfigError(f"process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
                          f"dist.new_group(...)), got {type(group).__name__}")
    return group.group_name, dist.get_world_size(group), int(bucket_cap_mb * 2 ** 20)
