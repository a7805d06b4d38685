"""Inductor's CUDA code generated on this CPU-only machine, for the tests of what reads it (inductor_memory).

A CPU build of torch cannot run CUDA, but Inductor's lowering, scheduling and wrapper generation only need fake CUDA
tensors (FakeTensorMode makes them) and answers to device queries: install() gives those of one H200 (sm_90)
to torch.cuda, Dynamo's CUDA device interface and Triton's driver, and turns off the passes that trace patterns or
fold constants on real tensors of the device (pattern matcher, joint-graph constant folding; they only change
which ops a graph has, not the statements a wrapper is made of). Nothing is compiled or launched: the wrapper is
taken before Inductor builds its kernels (sparsecc._torch.inductor_wrapper_code). install() patches the process
for good, so it runs in a subprocess of its own:

    python tests/fake_cuda.py OUT.json   compiles a bf16 Llama's training step (sparse update, fused loss) on the
                                         CPU, then generates the CUDA wrapper of the same graph, plain and with
                                         graph partitions (Inductor's form under CUDA graphs), walks each with
                                         inductor_memory.timeline and writes what it found to OUT.json
"""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (imported before the patches: its CUDA bindings are read at import)
import torch._inductor.graph  # noqa: F401

H200 = types.SimpleNamespace(
    name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, max_threads_per_multi_processor=2048,
    regs_per_multiprocessor=65536, warp_size=32, L2_cache_size=50 * 2**20, total_memory=140 * 2**30,
    shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472, max_threads_per_block=1024,
    gcnArchName="", clock_rate=1980000, memory_clock_rate=3200000, memory_bus_width=6144)


def install() -> None:
    import torch._inductor.config as inductor_config
    import torch._inductor.fx_passes.joint_graph as joint_graph
    import torch._inductor.fx_passes.post_grad as post_grad
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.utils._triton as torch_triton
    from torch._dynamo.device_interface import CudaInterface
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.driver import driver

    target = GPUTarget("cuda", 90, 32)
    answers = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
               "get_device_properties": lambda *a, **k: H200, "get_device_capability": lambda *a, **k: (9, 0),
               "get_device_name": lambda *a, **k: H200.name, "is_bf16_supported": lambda *a, **k: True,
               "_exchange_device": lambda index: 0, "_maybe_exchange_device": lambda index: 0,
               "set_device": lambda *a, **k: None, "synchronize": lambda *a, **k: None,
               "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
               "set_rng_state": lambda *a, **k: None}
    for name, fn in answers.items():
        setattr(torch.cuda, name, fn)
    for name in ("get_device_properties", "current_device", "device_count", "is_available", "is_bf16_supported"):
        setattr(CudaInterface, name, staticmethod(answers[name]))
    CudaInterface.get_compute_capability = staticmethod(lambda *a, **k: 90)
    CudaInterface.Worker.get_device_properties = staticmethod(answers["get_device_properties"])
    CudaInterface.Worker.current_device = staticmethod(answers["current_device"])

    class Driver:                   # Triton's active driver: the target Inductor generates kernels for
        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def is_active(self):
            return True
    driver.set_active(Driver())
    torch_triton.triton_backend = lambda: make_backend(target)
    torch_triton.has_triton.cache_clear()           # answered "no GPU" before
    fake_tensor.init_gpu_context = lambda device: None  # a CUDA build's FakeTensor would make a real CUDA tensor
    inductor_config.pattern_matcher = False
    inductor_config.joint_graph_constant_folding = False
    joint_graph.lazy_init = post_grad.lazy_init = lambda *a, **k: None
    # a Tensor method's Python binding opens a device guard, which a CPU build has none of for CUDA: the op has not
    torch.Tensor.copy_ = lambda self, src, non_blocking=False: torch.ops.aten.copy_.default(self, src, non_blocking)


def on_cuda(gm: torch.fx.GraphModule, example: list[torch.Tensor]):
    """gm with the devices of its factory calls made CUDA, and fake CUDA tensors like example (as the graph
    traced on a GPU would have them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") for t in example]
    for node in gm.graph.nodes:
        if node.kwargs.get("device") == torch.device("cpu"):
            node.kwargs = {**node.kwargs, "device": torch.device("cuda", 0)}
    gm.recompile()
    return gm, inputs


def main(out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import sparsecc
    from sparsecc import _torch, inductor_memory, train_step
    from models import make

    captured = {}
    compile_with_code = train_step.compile_fx_with_code

    def spy(gm, example):
        captured.update(gm=gm, example=example)
        return compile_with_code(gm, example)
    train_step.compile_fx_with_code = spy
    model, (ids,) = make("llama")
    model = model.to(torch.bfloat16)
    scheme = sparsecc.UpdateScheme({"model.layers.1.*norm.weight": "full", "model.norm.weight": "full",
                                    "model.layers.1.mlp.*.weight": sparsecc.Channels(0.25)})
    step = sparsecc.compile_train_step(model, lambda out, y: torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten()), optimizer=sparsecc.AdamW(lr=1e-3),
        update=scheme, example_inputs=(ids, ids))
    step(ids, ids)
    fused = any(n.target is torch.ops.sparsecc.linear_cross_entropy.default for n in captured["gm"].graph.nodes)
    install()
    gm, inputs = on_cuda(captured["gm"], captured["example"])
    outputs = [a for a in captured["gm"].graph.find_nodes(op="output")[0].args[0]]
    found = {"fused_loss": fused, "output_bytes": sum(v.meta["val"].untyped_storage().nbytes() for v in outputs)}
    import torch._inductor.config as inductor_config
    for form, settings in (("plain", {}), ("partitioned", {"triton.cudagraphs": True, "graph_partition": True})):
        with inductor_config.patch(settings):
            code = _torch.inductor_wrapper_code(gm, inputs)
        timeline = inductor_memory.timeline(code, inputs) if code else None
        returned = code[code.rindex("return ("):].split("\n")[0] if code else ""
        found[form] = {
            "statements": sorted(s for s in ("empty_strided_cuda(", "get_raw_stream(", "copy_if_misaligned(",
                                              "torch.cuda._DeviceGuard(", "def partition_0(args):",
                                              "torch.ops.sparsecc.linear_cross_entropy.default(")
                                 if code and s in code),
            "model": timeline and timeline.model, "peak": timeline and timeline.peak,
            "final_live": timeline and timeline.live_bytes[-1], "returned": returned,
            "float32_buffers": re.findall(r"empty_strided_cuda\(\(([\d, ]+)\),[^)]*\), torch\.float32\)", code or "")}
    Path(out).write_text(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1])
