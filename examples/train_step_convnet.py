"""A whole training step as one compiled graph: a conv net with BatchNorm fine-tuned with AdamW under a
sparse-update scheme. Prints the loss, the report (passes, FLOPs, memory model against a measurement),
and writes the HTML report with the memory timeline.

usage: python examples/train_step_convnet.py [--steps 40] [--html train_step_report.html]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc


def convnet(classes=4):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def batch(gen, n=64, classes=4):
    """Images whose class is the quadrant holding a bright blob."""
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(n, 1, 16, 16, generator=gen) * 0.3
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, r * 8 + 2:r * 8 + 6, col * 8 + 2:col * 8 + 6] += 2.0
    return x, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--html", default="train_step_report.html")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = convnet()
    scheme = sparsecc.UpdateScheme({
        "4.*": "full", "7.*": "full",                 # the upper BatchNorms
        "6.weight": sparsecc.Channels(0.25),          # a quarter of the last conv's input channels
        "11.*": "full",                               # the classifier
    })
    gen = torch.Generator().manual_seed(0)
    x, y = batch(gen)
    print("compiling the training step (forward + backward + AdamW)...", flush=True)
    step = sparsecc.compile_train_step(model, F.cross_entropy, optimizer=sparsecc.AdamW(lr=3e-2, weight_decay=0.0),
                                       update=scheme, example_inputs=(x, y))
    for i in range(1, args.steps + 1):
        x, y = batch(gen)
        loss = step(x, y)
        if i == args.steps // 2:
            step.set_lr(1e-2)                          # a schedule: no recompilation
        if i == 1 or i % 10 == 0:
            print(f"step {i:3d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    x, y = batch(gen, n=512)
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"accuracy on 512 fresh images: {accuracy:.3f}  (compilations: {step.compilations})")
    step.measure_memory(*batch(gen))
    print()
    print(step.report)
    print(f"\nreport written to {step.report.save_html(args.html)}")


if __name__ == "__main__":
    main()
