"""The yardstick: NoProp-DT's training step the way the PyTorch implementations write it.

A Python loop over the T blocks, each an nn.Module (conv32-pool-conv64-conv128-pool-FC256 image
path, label path with residual, head) with its own AdamW; the same shapes, losses and
hyperparameters as noprop.loss_dt. Optional: used by bench/speed.py only when torch is importable
(pip install torch); nothing else in noprop needs it.
"""
import time

import numpy as np
import torch
from torch import nn


def block(c_in, side, m, d):
    flat = 128 * (((side - 2) // 2 - 4) // 2) ** 2

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.img = nn.Sequential(
                nn.Conv2d(c_in, 32, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.2),
                nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Dropout(0.2),
                nn.Conv2d(64, 128, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.2),
                nn.Flatten(), nn.Linear(flat, 256), nn.BatchNorm1d(256))
            self.lab = nn.Sequential(nn.Linear(d, 256), nn.BatchNorm1d(256), nn.ReLU())
            self.res = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                     nn.Linear(256, 256), nn.BatchNorm1d(256))
            self.head = nn.Sequential(nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                      nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, m))

        def forward(self, x, z):
            h = self.lab(z)
            return self.head(torch.cat([self.img(x), h + self.res(h)], -1))

    return Block()


def ms_per_step(shape=(28, 28, 1), m=10, B=128, T=10, reps=5, eta=0.1):
    """Median ms of one step that trains all T blocks (and the classifier), PyTorch-style."""
    torch.manual_seed(0)
    blocks = [block(shape[-1], shape[0], m, m) for _ in range(T)]
    classifier = nn.Linear(m, m)
    opts = [torch.optim.AdamW(list(b.parameters()) + list(classifier.parameters()), 1e-3, weight_decay=1e-3)
            for b in blocks]
    s = 0.02  # the same cosine schedule as noprop.cosine_schedule
    ab = torch.cos(0.5 * torch.pi * (1 - torch.arange(T + 1) / T + s) / (1 + 2 * s)) ** 2
    snr = ab / (1 - ab)
    x = torch.rand(B, shape[-1], shape[0], shape[1])
    y = torch.randint(0, m, (B,))
    u = torch.eye(m)[y]

    def step():
        for t, (b, opt) in enumerate(zip(blocks, opts)):
            z = ab[t].sqrt() * u + (1 - ab[t]).sqrt() * torch.randn_like(u)
            zT = ab[-1].sqrt() * u + (1 - ab[-1]).sqrt() * torch.randn_like(u)
            l2 = ((torch.softmax(b(x, z), -1) - u) ** 2).sum(-1).mean()
            ce = nn.functional.cross_entropy(classifier(zT), y)
            loss = ce + 0.5 * T * eta * (snr[t + 1] - snr[t]) * l2
            opt.zero_grad()
            loss.backward()
            opt.step()

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))
