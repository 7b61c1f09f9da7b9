"""CoM-MLP vs dense MLP on scikit-learn's bundled digits (paper appendix A.2.2 in miniature).

The paper compares a dense 4-layer MLP with Chain-of-Model MLPs (every hidden Linear a chain Linear,
chain settings such as {8,8} or {4,12}) on CIFAR-10. Digits (1,797 8x8 images, bundled with
scikit-learn, no download) stands in: same recipe, Adam, a fixed number of epochs, test accuracy
and parameter count as mean +- std over 3 seeds. CPU only, about a minute.

    python bench/com_mlp_digits.py --out bench/results/com_mlp_digits_cpu_2026-11-23.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from colm.chain_linear import ChainLinear

HIDDEN = [256, 512, 256, 128]  # the paper's [768, 1024, 512, 256] scaled to 64-pixel inputs
SETTINGS = [None, (8, 8), (4, 4, 4, 4), (4, 12), (4, 4, 8)]


def split(total: int, chains) -> list[int]:
    return [total * c // sum(chains) for c in chains]


class MLP(nn.Module):
    """Input embedding Linear, then dense or chain Linears with ReLU, then a 10-class head."""

    def __init__(self, chains=None, in_dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, HIDDEN[0])
        layers = []
        for a, b in zip(HIDDEN[:-1], HIDDEN[1:]):
            layers.append(nn.Linear(a, b) if chains is None else ChainLinear(split(a, chains), split(b, chains), bias=True))
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(HIDDEN[-1], classes)
        if chains is not None:
            for layer in self.layers:
                for w in layer.weights:  # same fan-in scaled init as nn.Linear
                    nn.init.kaiming_uniform_(w, a=5 ** 0.5)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h)


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return xtr, xte, ytr, yte


def train_one(chains, seed: int, epochs: int, lr: float, batch: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    xtr, xte, ytr, yte = load_digits_split(seed)
    model = MLP(chains)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        acc = float((model(xte).argmax(-1) == yte).float().mean())
    return acc, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/com_mlp_digits.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    t0 = time.perf_counter()
    for chains in SETTINGS:
        accs, params = [], 0
        for seed in range(args.seeds):
            acc, params = train_one(chains, seed, args.epochs, args.lr, args.batch)
            accs.append(acc)
        rows.append({"model": "MLP (dense)" if chains is None else "CoM-MLP", "chains": list(chains) if chains else None,
                     "params": params, "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs),
                     "accs": accs})
    import sklearn

    result = {"bench": "com_mlp_digits", "device": f"cpu ({platform.processor() or platform.machine()})",
              "torch": torch.__version__, "sklearn": sklearn.__version__, "hidden": HIDDEN, "epochs": args.epochs,
              "lr": args.lr, "batch": args.batch, "seeds": args.seeds, "test_size": 0.3, "wall_s": time.perf_counter() - t0,
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'model':12s} {'chains':14s} {'params':>9s}  test accuracy (mean ± std, {args.seeds} seeds)")
    for r in rows:
        print(f"{r['model']:12s} {str(r['chains'] or '-'):14s} {r['params']:9,d}  {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} %")


if __name__ == "__main__":
    main()
