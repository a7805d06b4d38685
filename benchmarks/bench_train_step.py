"""Whole training steps with AdamW: step time and measured peak training memory, side by side in one run.

Variants (same model, scheme and data):
  eager-full          eager PyTorch, full fine-tuning, torch.optim.AdamW
  eager-freeze        layer-granular requires_grad freezing (every tensor the scheme touches is trained)
  eager-opt-in-bwd    that freezing plus optimizer-in-backward (register_post_accumulate_grad_hook): each
                      parameter is updated as soon as its gradient exists and the gradient is freed
  inductor-freeze     torch.compile (Inductor) of the model with that freezing; torch.optim.AdamW step
  sparsecc-backend    torch.compile(backend="sparsecc") with the scheme; torch.optim.AdamW on what trains
  sparsecc            sparsecc.compile_train_step with the scheme (Inductor executor): the one-graph step
Models: a transformers Llama (8 layers, hidden 384, intermediate 1024, 6/2 heads, vocab 8192, 4x256 tokens;
the last two blocks' norms, Channels(0.25) on the last MLP, the head), the small GPT of the tests (biases of
the upper half, Channels on upper MLPs, the head) and a conv net with BatchNorm.
Training memory = optimizer state (resident between steps) + the measured peak of everything allocated
during one step (forward, backward, update; profiler memory timeline) — the weights are not counted.

Section "sparse": the one-graph step of a sparsified GPT (examples/train_sparse_weights.py: 2 blocks, d=512,
8x128 tokens; MLP weights 32x32 blocks at 10 %, qkv at 25 %; everything trained, AdamW) on the sparse kernels
(cost_model="measure": where measured faster; "off": every call) against the same step reading each sparse
weight masked and dense (cost_model="dense"), and Inductor + torch.optim on the masked dense model.

usage: python benchmarks/bench_train_step.py [--rounds 15] [--quick] [--only llama|transformer|convnet|sparse]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsecc
from bench_sparse_update import convnet_case, layer_freeze, transformer_case
from common import cli, interleaved_medians
from sparsecc.memory import measure_peak

LR = 1e-3


def llama_case(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    layers, d, inter, vocab, batch, seq = (2, 64, 128, 512, 2, 32) if quick else (8, 384, 1024, 8192, 4, 256)
    config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=6 if not quick else 4, num_key_value_heads=2,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    last = layers - 1
    scheme = sparsecc.UpdateScheme({
        f"model.layers.{last - 1}.*norm.weight": "full", f"model.layers.{last}.*norm.weight": "full",
        f"model.layers.{last}.mlp.*.weight": sparsecc.Channels(0.25), "model.norm.weight": "full",
        "lm_head.weight": "full"})
    return "llama", model, (torch.randint(0, vocab, (batch, seq)),), scheme


def targets(name, model, inputs):
    if name == "llama":
        ids = inputs[0]
        return ids, lambda out, y: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())
    if name == "transformer":
        ids = inputs[0]
        return torch.randint(0, 512, ids.shape), lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    return torch.randint(0, 10, (inputs[0].shape[0],)), F.cross_entropy


def state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class EagerStep:
    def __init__(self, model, fn, params, loss_fn):
        self.model, self.fn, self.loss_fn = model, fn, loss_fn
        self.opt = torch.optim.AdamW(params, lr=LR)

    def __call__(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.fn(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def state(self):
        return [t for s in self.opt.state.values() for t in s.values()]


class OptimizerInBackward:
    """The strongest memory peer a PyTorch user has: update each parameter from a post-accumulate-grad hook."""

    def __init__(self, model, params, loss_fn):
        self.model, self.loss_fn = model, loss_fn
        self.opts = {p: torch.optim.AdamW([p], lr=LR) for p in params}
        for p in params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p):
        self.opts[p].step()
        p.grad = None

    def __call__(self, x, y):
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss

    def state(self):
        return [t for o in self.opts.values() for s in o.state.values() for t in s.values()]


def variants(name, model, inputs, scheme, loss_fn, y):
    x = inputs[0]
    out = {}
    m = copy.deepcopy(model)
    out["eager-full"] = EagerStep(m, m, m.parameters(), loss_fn)
    m = copy.deepcopy(model)
    out["eager-freeze"] = EagerStep(m, m, layer_freeze(m, scheme), loss_fn)
    m = copy.deepcopy(model)
    out["eager-opt-in-bwd"] = OptimizerInBackward(m, layer_freeze(m, scheme), loss_fn)
    m = copy.deepcopy(model)
    out["inductor-freeze"] = EagerStep(m, torch.compile(m), layer_freeze(m, scheme), loss_fn)
    m = copy.deepcopy(model)
    compiled = torch.compile(m, backend="sparsecc", options={"update": scheme})
    rules = scheme.resolve(dict(m.named_parameters()))
    out["sparsecc-backend"] = EagerStep(m, compiled, [p for n, p in m.named_parameters() if rules[n] != "frozen"],
                                        loss_fn)
    m = copy.deepcopy(model)
    step = sparsecc.compile_train_step(m, loss_fn, optimizer=sparsecc.AdamW(lr=LR), update=scheme,
                                       example_inputs=(x, y))
    step.state_tensors = lambda: [t for s in step.state.values() for t in s.values()]
    out["sparsecc"] = step
    return out


def sparse_section(rounds: int, quick: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_sparse_weights import GPT
    d, batch = (128, 2) if quick else (512, 8)
    spec = sparsecc.Sparsity({"blocks.*.fc*.weight": sparsecc.Blocks(32, density=0.1),
                              "blocks.*.qkv.weight": sparsecc.Blocks(32, density=0.25)})
    text = torch.randint(0, 256, (batch, 129))
    x, y = text[:, :-1], text[:, 1:]
    torch.manual_seed(0)
    base = GPT(d=d)
    sparsecc.sparsify(base, spec)

    def lm_loss(out, y):
        return F.cross_entropy(out.flatten(0, 1), y.flatten())

    steps = {}
    for cost_model in ("dense", "measure", "off"):
        steps[f"one-graph, {cost_model}"] = sparsecc.compile_train_step(
            copy.deepcopy(base), lm_loss, optimizer=sparsecc.AdamW(lr=LR), example_inputs=(x, y), cost_model=cost_model)
    m = copy.deepcopy(base)
    masks = {p: m.sparsecc_masks[n] for n, p in m.named_parameters() if n in m.sparsecc_masks}
    inductor = EagerStep(m, torch.compile(m), m.parameters(), lm_loss)

    def inductor_masked(x, y):      # dense training of a sparse model: the gradients masked by hand
        inductor.opt.zero_grad(set_to_none=True)
        loss = lm_loss(inductor.fn(x), y)
        loss.backward()
        for p, mask in masks.items():
            p.grad.mul_(mask)
        inductor.opt.step()
    steps["inductor, masked dense"] = inductor_masked
    times = interleaved_medians({k: (lambda s=s: s(x, y)) for k, s in steps.items()}, rounds)
    print(f"\nsparse weights: GPT 2 blocks d={d}, {batch}x128 tokens, AdamW; MLP 32x32 blocks at 10 %, qkv at 25 %")
    base_t = times["one-graph, dense"]
    for k, t in times.items():
        stats = steps[k].report.stats if isinstance(steps[k], sparsecc.TrainStep) else {}
        calls = f"{stats['sparse_ops']} sparse calls, {stats['sparse_refused']} dense" if stats else ""
        print(f"{k:26}{t * 1e3:9.1f} ms{base_t / t:8.2f}x vs the masked dense step   {calls}")


def main():
    cases = {"llama": llama_case, "transformer": transformer_case, "convnet": convnet_case}
    args = cli(__doc__, rounds=15, sections=(*cases, "sparse"))
    if args.only == "sparse":
        sparse_section(args.rounds, args.quick)
        return
    header = (f"{'model':12}{'variant':18}{'step ms':>9}{'speed-up':>9}{'opt state MB':>13}{'step peak MB':>13}"
              f"{'train mem MB':>13}{'vs full':>8}")
    print(header)
    print("-" * len(header))
    for case in [cases[args.only]] if args.only else cases.values():
        name, model, inputs, scheme = case(args.quick)
        y, loss_fn = targets(name, model, inputs)
        x = inputs[0]
        print(f"[{name}] compiling ...", file=sys.stderr, flush=True)
        steps = variants(name, model, inputs, scheme, loss_fn, y)
        times = interleaved_medians({k: (lambda s=s: s(x, y)) for k, s in steps.items()}, args.rounds)
        rows = {}
        for k, s in steps.items():
            if k == "sparsecc":
                peak, state = s.measure_memory(x, y), state_bytes(s.state_tensors())
            else:
                if isinstance(s, EagerStep):
                    s.opt.zero_grad(set_to_none=True)
                peak, state = measure_peak(lambda: s(x, y)), state_bytes(s.state())
            rows[k] = (times[k], state, peak)
        full_t, full_s, full_p = rows["eager-full"]
        for k, (t, state, peak) in rows.items():
            total = state + peak
            print(f"{name:12}{k:18}{t * 1e3:9.2f}{full_t / t:8.2f}x{state / 1e6:13.2f}{peak / 1e6:13.2f}"
                  f"{total / 1e6:13.2f}{(full_s + full_p) / total:7.2f}x")
        sp, ind = rows["sparsecc"], rows["inductor-freeze"]
        peers = {k: v for k, v in rows.items() if k not in ("sparsecc", "eager-full")}
        best_mem = min(peers, key=lambda k: peers[k][1] + peers[k][2])
        fastest = min(peers, key=lambda k: peers[k][0])
        print(f"{name:12}one-graph step: memory {(ind[1] + ind[2]) / (sp[1] + sp[2]):.2f}x lower and step "
              f"{ind[0] / sp[0]:.2f}x faster than inductor-freeze; memory {(full_s + full_p) / (sp[1] + sp[2]):.2f}x "
              f"lower than eager-full, {(peers[best_mem][1] + peers[best_mem][2]) / (sp[1] + sp[2]):.2f}x lower than "
              f"the best peer ({best_mem}); step {peers[fastest][0] / sp[0]:.2f}x vs the fastest peer ({fastest}); "
              f"step peak modelled {steps['sparsecc'].report.stats['peak_bytes_estimate'] / 1e6:.2f} MB "
              f"({steps['sparsecc'].report.timeline.model}), measured {sp[2] / 1e6:.2f} MB")
    if args.only is None:
        sparse_section(args.rounds, args.quick)


if __name__ == "__main__":
    main()
