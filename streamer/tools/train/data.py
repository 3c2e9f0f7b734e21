"""Training chains for the learned initial guess: random parameters, random Deribit-like
layouts, priced by our own pricer, reduced to the features of ``streamer.calib.learned``.

A sample is a chain as a calibrator would see it after its filters: 4 to 14 expiries from
hours to a year (one to three dailies, then weeklies to quarterlies, log-uniform), 6 to 30
out-of-the-money strikes per expiry over a random range of 1.5 to 3.5 ATM standard
deviations each side, model vols with noise (``NOISE_IV``), far-wing quotes without a vol
dropped. Parameters are drawn over the model's bounds (``PRIOR``: log-uniform for scales,
uniform otherwise, a little inside the box where its corner has no prices); a piecewise
model's pieces wander around a constant set (a random walk in ``ln t`` of random strength).
The target of a grid tenor is the value of the piece that holds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamer.calib.learned import (
    PIECE_PARAMS,
    TENOR_DAYS,
    encode,
    output_names,
    slice_smiles,
    smile_features,
)
from streamer.models import REGISTRY
from streamer.models.base import FloatArray, Model

NOISE_IV = 0.003
MIN_SLICES = 3
MIN_POINTS = 4  # per slice
# (low, high, log) per parameter base name
PRIOR: dict[str, tuple[float, float, bool]] = {
    "v0": (0.005, 3.0, True),
    "theta": (0.005, 3.0, True),
    "kappa": (0.1, 20.0, True),
    "xi": (0.1, 5.0, True),
    "rho": (-0.95, 0.9, False),
    "lam": (0.0, 3.0, False),
    "mu_j": (-1.0, 0.5, False),
    "sigma_j": (0.02, 1.2, True),
}
PIECE_WALK = {"theta": 0.6, "xi": 0.6, "rho": 0.6}  # largest step scale (ln / atanh units)


@dataclass(frozen=True)
class Chain:
    k: FloatArray
    T: FloatArray
    iv: FloatArray
    slice_idx: np.ndarray
    slice_T: FloatArray


def _draw(name: str, rng: np.random.Generator) -> float:
    lo, hi, log = PRIOR[name]
    if log:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def layout(rng: np.random.Generator) -> FloatArray:
    """Increasing maturities (years): 1-3 short ones (2 h to 4 days), then to a year."""
    n_short = int(rng.integers(1, 4))
    n_long = int(rng.integers(MIN_SLICES, 12))
    short = rng.uniform(2.0 / 24.0, 4.0, size=n_short)
    long = np.exp(rng.uniform(math.log(5.0), math.log(365.0), size=n_long))
    days = np.unique(np.round(np.concatenate([short, long]), 3))
    return np.asarray(days / 365.0, dtype=np.float64)


def parameters(model: Model, slice_T: FloatArray, rng: np.random.Generator) -> FloatArray:
    """A random parameter vector of ``model`` on ``slice_T``."""
    S = slice_T.shape[0]
    names = model.param_names(S)
    lo, hi = model.bounds(S)
    # in the order of the names (a set's order of strings changes with the process's hash
    # seed: the same rng seed drew other parameters in another process)
    bases = dict.fromkeys(n.split("[", 1)[0] for n in names)
    base_value = {b: _draw(b, rng) for b in bases}
    walk = {b: rng.uniform(0.0, s) for b, s in PIECE_WALK.items()}
    lt = np.log(slice_T)
    steps = np.sqrt(np.diff(np.concatenate([[lt[0] - 1.0], lt])) / max(lt[-1] - lt[0] + 1.0, 1.0))
    paths = {b: np.cumsum(walk[b] * steps * rng.standard_normal(S)) - 0.0 for b in PIECE_PARAMS}
    x = np.empty(len(names))
    for i, name in enumerate(names):
        base = name.split("[", 1)[0]
        v = base_value[base]
        if name.endswith("]") and base in paths:
            j = int(name[name.index("[") + 1 : -1])
            if base == "rho":
                v = math.tanh(math.atanh(v) + paths[base][j])
            else:
                v *= math.exp(paths[base][j])
        x[i] = v
    return np.clip(x, lo, hi)


def price_chain(
    model: Model, x: FloatArray, slice_T: FloatArray, rng: np.random.Generator
) -> Chain | None:
    """The chain's quotes (noisy mid vols); None when too few quotes have a vol."""
    ks, ts, idx = [], [], []
    # a rough ATM vol per slice from the expected variance (for the strike ranges)
    v_guess = max(float(x[0]), 0.02)
    for j, t in enumerate(slice_T):
        sd = math.sqrt(v_guess * t)
        n = int(rng.integers(6, 31))
        k = np.linspace(-rng.uniform(1.5, 3.5) * sd, rng.uniform(1.5, 3.5) * sd, n)
        ks.append(k)
        ts.append(np.full(n, t))
        idx.append(np.full(n, j, dtype=np.int64))
    k, T, sid = np.concatenate(ks), np.concatenate(ts), np.concatenate(idx)
    with np.errstate(all="ignore"):
        iv = np.asarray(model.implied_vol(x, k, T, sid), dtype=np.float64)
    iv = iv + NOISE_IV * rng.standard_normal(iv.shape[0])
    good = np.isfinite(iv) & (iv > 0.01)
    keep = [j for j in range(slice_T.shape[0]) if np.count_nonzero(good & (sid == j)) >= MIN_POINTS]
    if len(keep) < MIN_SLICES or np.count_nonzero(good) < 0.7 * good.shape[0]:
        return None
    remap = -np.ones(slice_T.shape[0], dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    m = good & (remap[sid] >= 0)
    return Chain(k[m], T[m], iv[m], remap[sid[m]], slice_T[keep])


def targets(model: Model, x: FloatArray, slice_T: FloatArray) -> FloatArray:
    """The network's target for parameters ``x`` on ``slice_T`` (learned scales)."""
    S = slice_T.shape[0]
    names = model.param_names(S)
    value = dict(zip(names, x.tolist(), strict=True))
    grid_T = TENOR_DAYS / 365.0
    piece = np.minimum(np.searchsorted(slice_T, grid_T, side="left"), S - 1)
    out = []
    for name in output_names(model):
        if "@" in name:
            base, g = name.split("@")
            v = value[f"{base}[{piece[int(g)]}]"]
        else:
            v = value[name]
        out.append(float(encode(name, np.array(v))))
    return np.array(out)


def make_set(
    model_name: str, n: int, seed: int
) -> tuple[FloatArray, FloatArray, list[tuple[FloatArray, FloatArray]]]:
    """``n`` samples: features ``(n, F)``, targets ``(n, O)`` and each sample's
    ``(x, slice_T)`` (for the guess-error report)."""
    model = REGISTRY[model_name]()
    rng = np.random.default_rng(seed)
    X: list[FloatArray] = []
    Y: list[FloatArray] = []
    truth: list[tuple[FloatArray, FloatArray]] = []
    while len(X) < n:
        slice_T = layout(rng)
        x = parameters(model, slice_T, rng)
        chain = price_chain(model, x, slice_T, rng)
        if chain is None:
            continue
        # the pieces of the fitted chain are its kept slices: re-draw on them
        if chain.slice_T.shape[0] != slice_T.shape[0]:
            continue
        sm = slice_smiles(chain.k, chain.iv, chain.slice_idx, chain.slice_T)
        f = smile_features(sm, chain.slice_T)
        if not np.all(np.isfinite(f)):
            continue
        X.append(f)
        Y.append(targets(model, x, chain.slice_T))
        truth.append((x, chain.slice_T))
    return np.array(X), np.array(Y), truth
