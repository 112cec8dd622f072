"""The lowest Eq. 13 loss a NoProp-FM model can reach without looking at the image, for one-hot embeddings.

Without x, the best velocity is v*(z_t, t) = E[u_y - z_0 | z_t] = (E[u_y | z_t] - z_t) / (1 - t), with the
posterior over the m classes p(y | z_t) proportional to exp(t <z_t, u_y> / (1 - t)^2) (one-hot: |u_y| = 1).
A training loss below this floor means the model uses the image; above it, it has not yet learned even
the label-blind part of the flow (reproducing the noise z_0 from z_t).

python results/fm_blind_floor.py   (Monte Carlo, 200,000 draws per m, a few seconds)
"""
import numpy as np


def blind_floor(m, n=200_000, seed=0, temperature=1.0):
    """Monte Carlo estimate of E |v*(z_t, t) - (u_y - z_0)|^2, t ~ U(0, 1), z_t = t u_y + (1 - t) z_0, and of
    E |u_y - z_0|^2 (the loss of v = 0). temperature != 1 tempers the posterior (worse: a test's check)."""
    rng = np.random.default_rng(seed)
    y, z0, t = rng.integers(0, m, n), rng.standard_normal((n, m)), rng.uniform(0, 1, (n, 1))
    u = np.eye(m)[y]
    zt = t * u + (1 - t) * z0
    logits = t * zt / (1 - t) ** 2 / temperature
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    v_star = (p - zt) / (1 - t)  # E[u_y | z_t] = p @ I = p
    return float(((v_star - (u - z0)) ** 2).sum(1).mean()), float(((u - z0) ** 2).sum(1).mean())


if __name__ == "__main__":
    for m in (10, 100):
        floor, zero = blind_floor(m)
        print(f"one-hot, m = d = {m:3d}: label-blind floor {floor:.2f}; v = 0 gives {zero:.2f}")
