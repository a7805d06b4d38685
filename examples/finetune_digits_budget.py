"""Fine-tuning under a memory budget with a searched sparse-update scheme (Tiny Training's recipe) on a real task:
scikit-learn's bundled 8x8 digits. A small conv net is pre-trained on digits 0-4; its classifier is replaced by a
new one for digits 5-9, and the net is fine-tuned on them with the scheme sparsecc.search_scheme picks for the
budget. Prints the search report and accuracy before and after.

usage: python examples/finetune_digits_budget.py [--budget 800KB] [--steps 150]
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc

BATCH = 64


def convnet() -> nn.Module:
    """Three conv-BN-ReLU blocks and a linear classifier of 5 classes (biases only where no BatchNorm follows)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


def digits_task(seed: int = 0):
    """(pretrain, finetune_train, finetune_test) as (x, y) tensors: digits 0-4 for pre-training, 5-9 (labelled 0-4)
    split in halves."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    new = y >= 5
    xn, yn = x[new], y[new] - 5
    order = torch.randperm(len(yn), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    return (x[~new], y[~new]), (xn[order[:half]], yn[order[:half]]), (xn[order[half:]], yn[order[half:]])


def batches(data, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n full batches, reshuffling the data each pass (every batch has the same shape: one compilation)."""
    x, y = data
    gen, out = torch.Generator().manual_seed(seed), []
    while len(out) < n:
        order = torch.randperm(len(y), generator=gen)
        out += [(x[order[i:i + BATCH]], y[order[i:i + BATCH]]) for i in range(0, len(y) - BATCH + 1, BATCH)]
    return out[:n]


def pretrain(data, epochs: int = 25, seed: int = 0) -> nn.Module:
    """The conv net trained on data, then given a new (random) classifier for the new task, in training mode."""
    torch.manual_seed(seed)
    model = convnet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    per_epoch = len(data[1]) // BATCH
    for x, y in batches(data, epochs * per_epoch, seed):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model[-1] = nn.Linear(32, 5)
    return model.train()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    """Accuracy in eval mode (BatchNorm running statistics); the model's mode is restored."""
    training = model.training
    model.eval()
    correct = (model(data[0]).argmax(1) == data[1]).float().mean().item()
    model.train(training)
    return correct


def finetune(model: nn.Module, scheme, data, steps: int, optimizer, seed: int = 1) -> sparsecc.TrainStep:
    """Fine-tune model in place for `steps` compiled training steps under scheme; returns the step."""
    train = batches(data, steps, seed)
    model.train()
    step = sparsecc.compile_train_step(model, F.cross_entropy, optimizer=optimizer, update=scheme,
                                       example_inputs=train[0], executor="eager")
    for x, y in train:
        step(x, y)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="800KB", help="training memory budget, e.g. 800KB, 1.2MB, 1MiB")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    args = ap.parse_args()
    old, train, test = digits_task()
    model = pretrain(old)
    print(f"pre-trained on digits 0-4, new classifier for 5-9: accuracy {accuracy(model, test):.3f} on 5-9")
    optimizer = sparsecc.SGD(lr=0.05, momentum=0.9)
    scheme, report = sparsecc.search_scheme(model, F.cross_entropy, batches(train, 12, seed=2), args.budget,
                                            optimizer=optimizer, report=True)
    print(report)
    tuned = copy.deepcopy(model)
    step = finetune(tuned, scheme, train, args.steps, optimizer)
    print(f"\nscheme for {args.budget}: {scheme.describe()}")
    print(f"training memory: {report.chosen.memory_estimate / 1e6:.3f} MB estimated, "
          f"{report.chosen.memory_measured / 1e6:.3f} MB measured (budget {report.budget / 1e6:.3f} MB)")
    print(f"accuracy on held-out 5-9 digits: {accuracy(model, test):.3f} before, {accuracy(tuned, test):.3f} after "
          f"{args.steps} steps ({step.compilations} compilation)")


if __name__ == "__main__":
    main()
