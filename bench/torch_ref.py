"""The yardsticks: noprop's training steps the way the PyTorch implementations write them.

dt: a Python loop over the T blocks, each an nn.Module (conv32-pool-conv64-conv128-pool-FC256
image path, label path with residual, head) with its own AdamW, as the public NoProp code does.
backprop: the same T blocks chained end to end (Eq. 18), one AdamW, cross-entropy at z_T.
ct, fm: the one CT/FM network (image, label and time paths, head; no batch norm) with Adam.
Same shapes, losses and hyperparameters as noprop's; CT's learned schedule is a learnable linear
gamma(t) here (its cost is a few hundred flops either way). Optional: used by bench/speed.py only
when torch is importable (pip install torch); nothing else in noprop needs it. On a CUDA GPU when
torch sees one (then timed between torch.cuda.synchronize calls), else on the CPU.
"""
import math
import time

import numpy as np
import torch
from torch import nn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    """Wait for the GPU's queued work, so that a timer reads finished work (nothing on a CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def image_path(c_in, side):
    flat = 128 * (((side - 2) // 2 - 4) // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(c_in, 32, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(64, 128, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(flat, 256))


class Block(nn.Module):
    """One DT block (Fig. 6 left): logits from image x and label z."""

    def __init__(self, c_in, side, m, d):
        super().__init__()
        self.img = nn.Sequential(image_path(c_in, side), nn.BatchNorm1d(256))
        self.lab = nn.Sequential(nn.Linear(d, 256), nn.BatchNorm1d(256), nn.ReLU())
        self.res = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                 nn.Linear(256, 256), nn.BatchNorm1d(256))
        self.head = nn.Sequential(nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                  nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, m))

    def forward(self, x, z):
        h = self.lab(z)
        return self.head(torch.cat([self.img(x), h + self.res(h)], -1))


class CTModel(nn.Module):
    """The CT/FM network (Fig. 6 right): image, label and time paths, then the head."""

    def __init__(self, c_in, side, m, d):
        super().__init__()
        self.img, self.lab, self.time = image_path(c_in, side), nn.Linear(d, 256), nn.Linear(64, 256)
        self.head = nn.Sequential(nn.Linear(768, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, m))
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(32) / 32))

    def forward(self, x, z, t):
        angles = 1000.0 * t[:, None] * self.freqs
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], -1)
        h = [torch.relu(self.img(x)), torch.relu(self.lab(z)), torch.relu(self.time(emb))]
        return self.head(torch.cat(h, -1))


def cosine_snr(T, s=0.02):
    """SNR(t) of noprop.cosine_schedule."""
    ab = torch.cos(0.5 * torch.pi * (1 - torch.arange(T + 1, device=DEVICE) / T + s) / (1 + 2 * s)) ** 2
    return ab, ab / (1 - ab)


def make_step(kind, x, y, m, T, eta):
    """A function that runs one training step of `kind` on the batch (x, y)."""
    c_in, side, d = x.shape[1], x.shape[2], m
    u = torch.eye(m, device=DEVICE)[y]
    if kind == "dt":
        blocks, classifier = [Block(c_in, side, m, d).to(DEVICE) for _ in range(T)], nn.Linear(d, m).to(DEVICE)
        opts = [torch.optim.AdamW(list(b.parameters()) + list(classifier.parameters()), 1e-3, weight_decay=1e-3)
                for b in blocks]
        ab, snr = cosine_snr(T)

        def step():
            for t, (b, opt) in enumerate(zip(blocks, opts)):
                z = ab[t].sqrt() * u + (1 - ab[t]).sqrt() * torch.randn_like(u)
                zT = ab[-1].sqrt() * u + (1 - ab[-1]).sqrt() * torch.randn_like(u)
                l2 = ((torch.softmax(b(x, z), -1) - u) ** 2).sum(-1).mean()
                loss = nn.functional.cross_entropy(classifier(zT), y) + 0.5 * T * eta * (snr[t + 1] - snr[t]) * l2
                opt.zero_grad()
                loss.backward()
                opt.step()
        return step
    if kind == "backprop":
        blocks, classifier = nn.ModuleList([Block(c_in, side, m, d) for _ in range(T)]).to(DEVICE), nn.Linear(d, m).to(DEVICE)
        w = nn.Parameter(torch.full((T,), math.atanh(0.5), device=DEVICE))
        opt = torch.optim.AdamW(list(blocks.parameters()) + list(classifier.parameters()) + [w], 1e-3, weight_decay=1e-3)

        def step():
            z = torch.randn_like(u)
            for t, b in enumerate(blocks):
                a = torch.tanh(w[t])
                z = (1 - a) * z + a * torch.softmax(b(x, z), -1)
            loss = nn.functional.cross_entropy(classifier(z), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step
    model, classifier = CTModel(c_in, side, m, d).to(DEVICE), nn.Linear(d, m).to(DEVICE)
    gamma = nn.Parameter(torch.tensor([-4.0, 4.0], device=DEVICE))  # gamma(t) = g0 + (g1 - g0)(1 - t), so SNR(t) = exp(-gamma(t))
    params = list(model.parameters()) + list(classifier.parameters()) + ([gamma] if kind == "ct" else [])
    opt = torch.optim.Adam(params, 1e-3, weight_decay=1e-3)

    def step():
        t = torch.rand(len(y), device=DEVICE)
        if kind == "ct":
            g = gamma[0] + (gamma[1] - gamma[0]) * (1 - t)
            ab = torch.sigmoid(-g)[:, None]
            z = ab.sqrt() * u + (1 - ab).sqrt() * torch.randn_like(u)
            snr_prime = torch.exp(-g) * (gamma[1] - gamma[0])
            sdm = 0.5 * eta * (snr_prime * ((torch.softmax(model(x, z, t), -1) - u) ** 2).sum(-1)).mean()
            ab1 = torch.sigmoid(-gamma[0])
            loss = sdm + nn.functional.cross_entropy(classifier(ab1.sqrt() * u + (1 - ab1).sqrt() * torch.randn_like(u)), y)
        else:
            z0 = torch.randn_like(u)
            z = t[:, None] * u + (1 - t[:, None]) * z0
            loss = ((model(x, z, t) - (u - z0)) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def ms_per_step(kind="dt", shape=(28, 28, 1), m=10, B=128, T=10, reps=5, eta=None):
    """Median ms of one training step of `kind` (dt: all T blocks and the classifier), PyTorch-style."""
    torch.manual_seed(0)
    x, y = torch.rand(B, shape[-1], shape[0], shape[1], device=DEVICE), torch.randint(0, m, (B,), device=DEVICE)
    step = make_step(kind, x, y, m, T, eta if eta is not None else (0.1 if kind == "dt" else 1.0))
    step()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def seconds_inference(kind="ct", shape=(28, 28, 1), m=10, n_images=10000, steps=1000, chunk=1000):
    """Seconds of CT (Eq. 3 on a grid) or FM (Euler) inference over n_images, image path once per image."""
    torch.manual_seed(0)
    model = CTModel(shape[-1], shape[0], m, m).to(DEVICE).eval()
    x = torch.rand(n_images, shape[-1], shape[0], shape[1], device=DEVICE)
    ab = torch.sigmoid(torch.linspace(-4.0, 4.0, steps + 1, device=DEVICE))  # an increasing alpha_bar on the grid
    al = torch.cat([ab[:-1] / ab[1:], ab[-1:]])
    a = ab[1:].sqrt() * (1 - al[:-1]) / (1 - ab[:-1])
    b = al[:-1].sqrt() * (1 - ab[1:]) / (1 - ab[:-1])
    c = (1 - ab[1:]) * (1 - al[:-1]) / (1 - ab[:-1])
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for xb in x.split(chunk):
            img, z = torch.relu(model.img(xb)), torch.randn(len(xb), m, device=DEVICE)
            for k in range(steps):
                angles = 1000.0 * torch.full((len(xb), 1), k / steps, device=DEVICE) * model.freqs
                emb = torch.cat([torch.sin(angles), torch.cos(angles)], -1)
                out = model.head(torch.cat([img, torch.relu(model.lab(z)), torch.relu(model.time(emb))], -1))
                if kind == "fm":
                    z = z + out / steps
                else:
                    z = a[k] * torch.softmax(out, -1) + b[k] * z + c[k].sqrt() * torch.randn_like(z)
    sync()
    return time.perf_counter() - t0
