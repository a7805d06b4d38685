"""Sparse-update fine-tuning of a transformers Llama (tiny config, no download) with sparsecc.

PockEngine-style scheme: the norms of the upper layer, a quarter of the input channels of its MLP
projections, half the output rows of its attention output projection, and the LM head. Trains on a
synthetic next-token task, prints the loss, the report summary, and writes the report as HTML.

usage: python examples/finetune_sparse_update.py [--steps 30] [--html sparsecc_report.html]
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsecc


def batches(vocab, batch, seq, seed=0):
    """Sequences that count upward modulo vocab from a random start: a pattern a model can learn."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        yield (start + torch.arange(seq + 1)) % vocab


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--html", default="sparsecc_report.html")
    ap.add_argument("--executor", default="inductor", choices=["inductor", "eager"])
    args = ap.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    scheme = sparsecc.UpdateScheme({
        "model.layers.3.*norm.weight": "full",
        "model.layers.3.mlp.*_proj.weight": sparsecc.Channels(0.25),
        "model.layers.3.self_attn.o_proj.weight": sparsecc.Channels(0.5, dim="out"),
        "model.norm.weight": "full",
        "lm_head.weight": "full",
    })
    compiled = torch.compile(model, backend="sparsecc", options={"update": scheme, "executor": args.executor})
    trained = [p for n, p in model.named_parameters() if scheme.rule_for(n) != "frozen"]
    opt = torch.optim.AdamW(trained, lr=3e-3, weight_decay=0.0)

    print(f"training {sum(p.numel() for p in trained):,} of {sum(p.numel() for p in model.parameters()):,} "
          f"parameters (the tensors the scheme touches); compiling...", flush=True)
    data = batches(config.vocab_size, batch=8, seq=32)
    for step in range(1, args.steps + 1):
        tokens = next(data)
        logits = compiled(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)

    report = sparsecc.reports()[-1]
    print()
    print(report)
    print(f"\nreport written to {report.save_html(args.html)}")


if __name__ == "__main__":
    main()
