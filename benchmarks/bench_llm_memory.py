"""Fine-tuning memory at a language model's vocabulary: where the logits dominate what a step allocates.

A transformers Llama with a realistic vocabulary (32,000) but small width so it runs on a laptop CPU
(4 layers, hidden 256, intermediate 688, 4/2 heads, 8x256 tokens, untied head); PockEngine-style scheme: the
last two blocks' norms, Channels(0.25) on the last MLP, the final norm and the head. AdamW. Variants:
  inductor-freeze        torch.compile (Inductor) with requires_grad freezing; torch.optim.AdamW
  inductor-freeze-b0.5   the same under Inductor's activation_memory_budget=0.5 (recompute to save memory)
  inductor-freeze-b0.1   ... and 0.1
  sparsecc-unfused       sparsecc.compile_train_step with fuse_loss=False (the full logits exist)
  sparsecc               sparsecc.compile_train_step (head and loss fused, chunked over tokens)
  sparsecc-m0.9 ...      the same with memory_budget= 90 %, 75 %, 60 % of sparsecc's own modelled peak
                         (a budget below the lowest reachable peak prints that floor instead of a row)
Training memory = optimizer state + the measured peak of everything a step allocates (profiler memory
timeline); the weights are not counted. The logits alone are 8*256*32000*4 B = 262 MB in float32.
"model MB" is sparsecc's liveness model of the step (what memory_budget= is held to).

Section "full" runs the same variants with every parameter trained (no freezing): there the backward keeps
the activations of every layer, which is what memory_budget= and activation_memory_budget trade.

usage: python benchmarks/bench_llm_memory.py [--rounds 5] [--quick] [--only sparse-update|full]
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

import sparsecc
from bench_sparse_update import layer_freeze
from bench_train_step import LR, EagerStep, state_bytes
from common import cli, interleaved_medians
from sparsecc._torch import functorch_config
from sparsecc.memory import measure_peak


def case(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    layers, d, inter, vocab, batch, seq = (2, 64, 128, 4096, 2, 64) if quick else (4, 256, 688, 32000, 8, 256)
    config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                         tie_word_embeddings=False)
    last = layers - 1
    scheme = sparsecc.UpdateScheme({
        f"model.layers.{last - 1}.*norm.weight": "full", f"model.layers.{last}.*norm.weight": "full",
        f"model.layers.{last}.mlp.*.weight": sparsecc.Channels(0.25), "model.norm.weight": "full",
        "lm_head.weight": "full"})
    ids = torch.randint(0, vocab, (batch, seq))
    return LlamaForCausalLM(config), ids, scheme


def loss_fn(out, y):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())


class BudgetedStep(EagerStep):
    """Inductor + freezing, compiled (at the first call) under activation_memory_budget."""

    def __init__(self, model, params, budget):
        super().__init__(model, torch.compile(model), params, loss_fn)
        self.budget, self.compiled = budget, False

    def __call__(self, x, y):
        if self.compiled:
            return super().__call__(x, y)
        with functorch_config.patch(activation_memory_budget=self.budget):
            self.compiled = True
            return super().__call__(x, y)


def variants(model, scheme, x, y):
    out = {}
    m = copy.deepcopy(model)
    out["inductor-freeze"] = EagerStep(m, torch.compile(m), layer_freeze(m, scheme), loss_fn)
    for budget in (0.5, 0.1):
        m = copy.deepcopy(model)
        out[f"inductor-freeze-b{budget}"] = BudgetedStep(m, layer_freeze(m, scheme), budget)
    for name, fuse in (("sparsecc-unfused", False), ("sparsecc", True)):
        m = copy.deepcopy(model)
        out[name] = sparsecc.compile_train_step(m, loss_fn, optimizer=sparsecc.AdamW(lr=LR), update=scheme,
                                                example_inputs=(x, y), fuse_loss=fuse)
    modelled = out["sparsecc"].report.stats["peak_bytes_estimate"]
    for fraction in (0.9, 0.75, 0.6):
        m = copy.deepcopy(model)
        try:
            out[f"sparsecc-m{fraction}"] = sparsecc.compile_train_step(
                m, loss_fn, optimizer=sparsecc.AdamW(lr=LR), update=scheme, example_inputs=(x, y),
                memory_budget=int(modelled * fraction))
        except sparsecc.ConfigError as e:
            print(f"sparsecc-m{fraction}: {e}")
    return out


def main():
    args = cli(__doc__, rounds=5, sections=("sparse-update", "full"))
    for section in [args.only] if args.only else ["sparse-update", "full"]:
        model, x, scheme = case(args.quick)
        print(f"\n[{section}]")
        run(model, x, scheme if section == "sparse-update" else sparsecc.UpdateScheme.full(), args.rounds)


def run(model, x, scheme, rounds):
    y = x
    print("[llm] compiling 8 variants ...", file=sys.stderr, flush=True)
    steps = variants(model, scheme, x, y)
    times = interleaved_medians({k: (lambda s=s: s(x, y)) for k, s in steps.items()}, rounds, warmup=2)
    header = (f"{'variant':22}{'step ms':>9}{'opt state MB':>13}{'step peak MB':>13}{'train mem MB':>13}"
              f"{'vs ind.':>8}{'model MB':>10}")
    print(header)
    print("-" * len(header))
    rows = {}
    for k, s in steps.items():
        if isinstance(s, EagerStep):
            s.opt.zero_grad(set_to_none=True)
            rows[k] = (times[k], state_bytes(s.state()), measure_peak(lambda: s(x, y)))
        else:
            rows[k] = (times[k], state_bytes(t for st in s.state.values() for t in st.values()),
                       s.measure_memory(x, y))
    ind_t, ind_s, ind_p = rows["inductor-freeze"]
    for k, (t, state, peak) in rows.items():
        modelled = f"{steps[k].report.stats['peak_bytes_estimate'] / 1e6:10.2f}" if k.startswith("sparsecc") else ""
        print(f"{k:22}{t * 1e3:9.1f}{state / 1e6:13.2f}{peak / 1e6:13.2f}{(state + peak) / 1e6:13.2f}"
              f"{(ind_s + ind_p) / (state + peak):7.2f}x{modelled}")
    sp = rows["sparsecc"]
    best = min((k for k in rows if k.startswith("inductor")), key=lambda k: rows[k][1] + rows[k][2])
    fused = [n for p in steps["sparsecc"].report.passes for n in p.notes if "fused" in n]
    print(f"sparsecc: training memory {(ind_s + ind_p) / (sp[1] + sp[2]):.2f}x lower than inductor-freeze "
          f"({(rows[best][1] + rows[best][2]) / (sp[1] + sp[2]):.2f}x vs the lowest Inductor row, {best}), step "
          f"{ind_t / sp[0]:.2f}x the speed of inductor-freeze; fused loss: "
          f"{'; '.join(fused) or 'not applied'}")


if __name__ == "__main__":
    main()
