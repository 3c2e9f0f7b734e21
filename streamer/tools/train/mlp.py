"""Training the learned guess's network in numpy: a tanh MLP, mean squared error on
standardised targets, Adam (Kingma and Ba 2015) on mini-batches, the step decayed by a cosine
schedule; the weights with the best held-out error are kept.

References:
    D. Kingma, J. Ba, "Adam: a method for stochastic optimization", ICLR (2015).
    X. Glorot, Y. Bengio, "Understanding the difficulty of training deep feedforward neural
    networks", AISTATS (2010) (the initial weights).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from streamer.calib.learned import Network
from streamer.models.base import FloatArray

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@dataclass(frozen=True)
class TrainSettings:
    hidden: tuple[int, ...] = (64, 64)
    epochs: int = 150
    batch: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-5
    seed: int = 0


@dataclass(frozen=True)
class TrainReport:
    epochs: int
    train_mse: float
    valid_mse: float  # on standardised targets
    valid_rmse: FloatArray  # per output, on the learned scale


def _forward(
    Ws: list[FloatArray], bs: list[FloatArray], x: FloatArray
) -> tuple[FloatArray, list[FloatArray]]:
    acts = [x]
    h = x
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        h = h @ W + b
        if i < len(Ws) - 1:
            h = np.tanh(h)
        acts.append(h)
    return h, acts


def train(
    X: FloatArray, Y: FloatArray, outputs: tuple[str, ...], s: TrainSettings
) -> tuple[Network, TrainReport]:
    """Fit a network to features ``X`` and targets ``Y`` (10% held out)."""
    rng = np.random.default_rng(s.seed)
    n = X.shape[0]
    perm = rng.permutation(n)
    n_val = max(1, n // 10)
    val, tr = perm[:n_val], perm[n_val:]
    x_mean, x_scale = X[tr].mean(axis=0), X[tr].std(axis=0) + 1e-6
    y_mean, y_scale = Y[tr].mean(axis=0), Y[tr].std(axis=0) + 1e-6
    xs, ys = (X - x_mean) / x_scale, (Y - y_mean) / y_scale
    sizes = [X.shape[1], *s.hidden, Y.shape[1]]
    Ws = [
        rng.normal(0.0, math.sqrt(2.0 / (a + b)), size=(a, b)) for a, b in itertools.pairwise(sizes)
    ]
    bs = [np.zeros(b) for b in sizes[1:]]
    params = Ws + bs
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    step = 0
    steps_per_epoch = max(1, math.ceil(tr.shape[0] / s.batch))
    total = s.epochs * steps_per_epoch
    best = (math.inf, [p.copy() for p in params])
    train_mse = math.inf
    for _epoch in range(s.epochs):
        order = rng.permutation(tr)
        losses = []
        for i in range(steps_per_epoch):
            batch = order[i * s.batch : (i + 1) * s.batch]
            xb, yb = xs[batch], ys[batch]
            out, acts = _forward(Ws, bs, xb)
            err = out - yb
            losses.append(float(np.mean(err * err)))
            delta = 2.0 * err / err.size
            gW: list[FloatArray] = [np.empty(0)] * len(Ws)
            gb: list[FloatArray] = [np.empty(0)] * len(Ws)
            for layer in range(len(Ws) - 1, -1, -1):
                gW[layer] = acts[layer].T @ delta + s.weight_decay * Ws[layer]
                gb[layer] = delta.sum(axis=0)
                if layer:
                    delta = (delta @ Ws[layer].T) * (1.0 - acts[layer] ** 2)
            grads = gW + gb
            step += 1
            lr = 0.5 * s.lr * (1.0 + math.cos(math.pi * step / total))
            for j, (p, g) in enumerate(zip(params, grads, strict=True)):
                m1[j] = BETA1 * m1[j] + (1.0 - BETA1) * g
                m2[j] = BETA2 * m2[j] + (1.0 - BETA2) * g * g
                mh = m1[j] / (1.0 - BETA1**step)
                vh = m2[j] / (1.0 - BETA2**step)
                np.subtract(p, lr * mh / (np.sqrt(vh) + EPS), out=p)  # in place
        train_mse = float(np.mean(losses))
        out, _ = _forward(Ws, bs, xs[val])
        v = float(np.mean((out - ys[val]) ** 2))
        if v < best[0]:
            best = (v, [p.copy() for p in params])
    k = len(Ws)
    Ws, bs = best[1][:k], best[1][k:]
    out, _ = _forward(Ws, bs, xs[val])
    rmse = np.sqrt(np.mean(((out - ys[val]) * y_scale) ** 2, axis=0))
    net = Network(
        weights=tuple(W.astype(np.float32).astype(np.float64) for W in Ws),
        biases=tuple(b.astype(np.float32).astype(np.float64) for b in bs),
        x_mean=x_mean,
        x_scale=x_scale,
        y_mean=y_mean,
        y_scale=y_scale,
        outputs=outputs,
    )
    return net, TrainReport(s.epochs, train_mse, best[0], rmse)
