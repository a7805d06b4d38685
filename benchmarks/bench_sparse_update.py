"""Sparse-update training step: sparsecc against what a PyTorch user can do, measured side by side in one run.

For a small transformer and a small conv net under a PockEngine-style scheme (biases of the upper half,
Channels(0.25) on a few upper weights, the head in full), prints step time (forward + backward + SGD),
backward FLOPs and bytes saved for backward, for:
  eager-full     eager PyTorch, full backprop
  eager-freeze   eager with the best layer-granular requires_grad freezing (every tensor the scheme touches)
  inductor-freeze  torch.compile (Inductor) with that freezing
  sparsecc       torch.compile(backend="sparsecc") with the scheme
Eager FLOPs come from torch.utils.flop_counter during backward and eager saved bytes from saved-tensor
hooks (unique storages, parameters and inputs excluded); compiled ones from the partitioned graphs.

usage: python benchmarks/bench_sparse_update.py [--rounds 20] [--quick]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sparsecc  # noqa: E402
from common import cli, interleaved_medians  # noqa: E402
from models import ConvNet, Transformer  # noqa: E402

C = sparsecc.Channels


def transformer_case(quick: bool):
    layers, d, seq, batch = (2, 64, 32, 4) if quick else (6, 256, 128, 8)
    model = Transformer(vocab=512, d=d, heads=4, layers=layers, seq=seq, tied=False)
    upper = range(layers // 2, layers)
    rules = {f"blocks.{i}.*.bias": "full" for i in upper}
    rules.update({f"blocks.{layers - 1}.mlp.fc1.weight": C(0.25), f"blocks.{layers - 1}.mlp.fc2.weight": C(0.25),
                  f"blocks.{layers - 2}.mlp.fc1.weight": C(0.25), "ln_f.*": "full", "head.*": "full"})
    ids = torch.randint(0, 512, (batch, seq))
    return "transformer", model, (ids,), sparsecc.UpdateScheme(rules)


def convnet_case(quick: bool):
    c, hw, batch = (8, 16, 8) if quick else (32, 32, 32)
    model = ConvNet(c=c, classes=10)
    rules = {"pw.bias": "full", "bn2.*": "full", "bn3.*": "full", "pw.weight": C(0.25), "head.*": "full"}
    return "convnet", model, (torch.randn(batch, 3, hw, hw),), sparsecc.UpdateScheme(rules)


def loss_fn(out):
    return out.float().square().mean()


def layer_freeze(model, scheme):
    """requires_grad=False on every parameter the scheme does not touch at all (the best a user can write)."""
    rules = scheme.resolve(dict(model.named_parameters()))
    for name, p in model.named_parameters():
        p.requires_grad_(rules[name] != "frozen")
    return [p for p in model.parameters() if p.requires_grad]


def eager_backward_measures(model, inputs):
    """(backward FLOPs, bytes saved for backward) of one eager step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {t.untyped_storage().data_ptr() for t in inputs}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(*inputs))
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), sum(storages.values())


def make_variants(model, inputs, scheme):
    variants = {}
    m = copy.deepcopy(model)
    variants["eager-full"] = (m, m, torch.optim.SGD(m.parameters(), lr=1e-3), eager_backward_measures(m, inputs))
    m = copy.deepcopy(model)
    trained = layer_freeze(m, scheme)
    variants["eager-freeze"] = (m, m, torch.optim.SGD(trained, lr=1e-3), eager_backward_measures(m, inputs))
    m = copy.deepcopy(model)
    trained = layer_freeze(m, scheme)
    report = sparsecc.explain(m, *inputs, loss_fn=loss_fn, update=sparsecc.UpdateScheme(
        {name: "full" for name, p in m.named_parameters() if p.requires_grad}))
    variants["inductor-freeze"] = (m, torch.compile(m), torch.optim.SGD(trained, lr=1e-3),
                                   (report.stats["backward_flops_after"], report.stats["saved_bytes_after"]))
    m = copy.deepcopy(model)
    compiled = torch.compile(m, backend="sparsecc", options={"update": scheme})
    first = len(sparsecc.reports())
    loss_fn(compiled(*inputs)).backward()
    report = sparsecc.reports()[first]
    trained = [p for p in m.parameters() if p.grad is not None]
    m.zero_grad(set_to_none=True)
    variants["sparsecc"] = (m, compiled, torch.optim.SGD(trained, lr=1e-3),
                            (report.stats["backward_flops_after"], report.stats["saved_bytes_after"]))
    return variants


def step(fn, opt, inputs):
    opt.zero_grad(set_to_none=True)
    loss_fn(fn(*inputs)).backward()
    opt.step()


def main():
    args = cli(__doc__, rounds=20)
    header = f"{'model':12}{'variant':17}{'step ms':>9}{'vs full':>9}{'bwd GFLOP':>11}{'vs full':>9}{'saved MB':>10}{'vs full':>9}"
    print(header)
    print("-" * len(header))
    for case in (transformer_case, convnet_case):
        name, model, inputs, scheme = case(args.quick)
        print(f"[{name}] compiling ...", file=sys.stderr, flush=True)
        variants = make_variants(model, inputs, scheme)
        times = interleaved_medians({k: (lambda fn=fn, opt=opt: step(fn, opt, inputs))
                                     for k, (_, fn, opt, _) in variants.items()}, args.rounds)
        full_t = times["eager-full"]
        full_f, full_b = variants["eager-full"][3]
        for k, (_, _, _, (flops, saved)) in variants.items():
            print(f"{name:12}{k:17}{times[k] * 1e3:9.2f}{full_t / times[k]:8.2f}x{flops / 1e9:11.3f}"
                  f"{flops / full_f:9.3f}{saved / 1e6:10.2f}{saved / full_b:9.3f}")
        sp, ind = times["sparsecc"], times["inductor-freeze"]
        print(f"{name:12}sparsecc speed-up: {full_t / sp:.2f}x vs eager-full, {times['eager-freeze'] / sp:.2f}x vs "
              f"eager-freeze, {ind / sp:.2f}x vs inductor-freeze")


if __name__ == "__main__":
    main()
