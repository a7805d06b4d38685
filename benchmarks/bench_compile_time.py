"""Compile time against model depth: sparsecc's two entry points against Inductor compiling the same model.

For a transformers Llama (hidden 384, intermediate 1024, 6/2 heads, vocab 8192, 2x128 tokens) at 2, 8 and
32 layers and a full-width transformers MobileNetV2 (224x224, batch 4), each under a PockEngine-style
scheme, the seconds from nothing to the first finished training step for:
  inductor-freeze        torch.compile (Inductor) with requires_grad freezing; forward + backward
  backend (inductor)     torch.compile(backend=sparsecc.backend(update=scheme)); forward + backward
  backend (eager)        the same with executor="eager" (FX graphs run as they are)
  train step (inductor)  sparsecc.compile_train_step (forward + backward + AdamW as one graph)
  train step (eager)     the same with executor="eager"
and, for the train step, where its time goes (Dynamo capture, joint trace, passes, code generation).
Each (model, variant) runs in a fresh Python process with an empty Inductor cache directory, so every number
is a cold compile (the imports are done before the clock starts; Inductor's C++ kernels are compiled anew).

usage: python benchmarks/bench_compile_time.py [--quick] [--only llama2|llama8|llama32|mobilenet_v2]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import sparsecc
from bench_sparse_update import layer_freeze
from common import cli

C = sparsecc.Channels


def llama(layers: int, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    d, inter, vocab, heads = (64, 128, 512, 4) if quick else (384, 1024, 8192, 6)
    config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=128)
    last = layers - 1
    scheme = sparsecc.UpdateScheme({f"model.layers.{last - 1}.*norm.weight": "full",
                                    f"model.layers.{last}.*norm.weight": "full",
                                    f"model.layers.{last}.mlp.*.weight": C(0.25), "lm_head.weight": "full"})
    ids = torch.randint(0, vocab, (2, 128))
    return LlamaForCausalLM(config), ids, ids, \
        lambda out, y: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten()), scheme


def mobilenet_v2(quick: bool):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    config = MobileNetV2Config(image_size=64 if quick else 224, num_labels=10, classifier_dropout_prob=0.0)
    scheme = sparsecc.UpdateScheme({"mobilenet_v2.layer.15.*.normalization.*": "full",
                                    "mobilenet_v2.conv_1x1.*": "full",
                                    "mobilenet_v2.layer.15.reduce_1x1.convolution.weight": C(0.25),
                                    "classifier.*": "full"})
    size = 64 if quick else 224
    return MobileNetV2ForImageClassification(config), torch.randn(4, 3, size, size), torch.randint(0, 10, (4,)), \
        lambda out, y: F.cross_entropy(out.logits, y), scheme


def time_compiled_model(model, x, y, loss_fn, backend) -> float:
    start = time.perf_counter()
    compiled = torch.compile(model, backend=backend)
    loss_fn(compiled(x), y).backward()
    return time.perf_counter() - start


def time_train_step(model, x, y, loss_fn, scheme, executor):
    start = time.perf_counter()
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(lr=1e-3), update=scheme,
                                       example_inputs=(x, y), executor=executor)
    step(x, y)
    return time.perf_counter() - start, {k[8:]: v for k, v in step.report.stats.items() if k.startswith("seconds_")}


CASES = {"llama2": lambda q: llama(2, q), "llama8": lambda q: llama(8, q), "llama32": lambda q: llama(32, q),
         "mobilenet_v2": mobilenet_v2}
VARIANTS = ("inductor-freeze", "backend-inductor", "backend-eager", "step-inductor", "step-eager")


def run_one(case: str, variant: str, quick: bool) -> None:
    """In this (fresh) process: compile one variant of one case, print its seconds (and phases) as JSON."""
    torch.manual_seed(0)
    model, x, y, loss_fn, scheme = CASES[case](quick)
    phases = {}
    if variant == "inductor-freeze":
        layer_freeze(model, scheme)
        seconds = time_compiled_model(model, x, y, loss_fn, "inductor")
    elif variant.startswith("backend"):
        seconds = time_compiled_model(model, x, y, loss_fn, sparsecc.backend(update=scheme, executor=variant[8:]))
    else:
        seconds, phases = time_train_step(model, x, y, loss_fn, scheme, variant[5:])
    print(json.dumps({"seconds": seconds, "phases": phases}))


def measure(case: str, variant: str, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "SPARSECC_PROGRESS": "0"}
        cmd = [sys.executable, __file__, "--one", case, variant] + (["--quick"] if quick else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{case} {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if "--one" in sys.argv:
        i = sys.argv.index("--one")
        return run_one(sys.argv[i + 1], sys.argv[i + 2], "--quick" in sys.argv)
    args = cli(__doc__, rounds=1, sections=tuple(CASES))
    header = (f"{'model':14}{'inductor-freeze':>16}{'backend ind.':>13}{'backend eager':>14}{'step ind.':>11}"
              f"{'step eager':>11}{'step/ind.':>10}   train step: capture / joint / passes / codegen s")
    print(header)
    print("-" * len(header))
    for name in [args.only] if args.only else CASES:
        row, phases = [], {}
        for variant in VARIANTS:
            print(f"[{name}] {variant} ...", file=sys.stderr, flush=True)
            result = measure(name, variant, args.quick)
            row.append(result["seconds"])
            phases = phases or result["phases"]
        print(f"{name:14}" + "".join(f"{t:>{w}.1f}" for t, w in zip(row, (16, 13, 14, 11, 11)))
              + f"{row[3] / row[0]:>9.2f}x   " + " / ".join(f"{phases.get(k, 0):.1f}"
                                                       for k in ("capture", "joint", "passes", "codegen")),
              flush=True)


if __name__ == "__main__":
    main()
