r"""A learned initial guess: chain features -> model parameters by a small network (numpy).

The "deep calibration" line of work (Hernandez 2016; Horvath, Muguruza and Tomas 2021) learns
the map from market data to model parameters offline, so that a cold fit starts where the
local optimiser needs only a few steps. Here the network is a guess, never the answer: the
LM polishes it (``streamer.calib.surface``), and the global search is the fallback.

Features (``features``): per fitted expiry a quadratic in standardised moneyness through its
mid IVs, ``iv(z) ~ a + b z + c z^2`` with ``z = k / (a0 sqrt T)`` (``a0`` the ATM vol of the
quotes nearest the forward, the quotes with ``|z| <= Z_FIT``, least squares): the ATM vol,
skew and curvature. They are interpolated in ``ln T`` onto the fixed tenor grid
``TENOR_DAYS`` (flat beyond the quoted expiries), as ``ln a, b, c`` per tenor, plus ``ln T``
of the shortest and longest expiry: ``3 G + 2`` numbers whatever the chain's layout.

Network: a multilayer perceptron, ``h_{l+1} = tanh(W_l h_l + b_l)``, linear output, on
standardised inputs and outputs (means and scales stored with the weights), trained offline
(``streamer train``, ``streamer.tools.train``) on chains priced by our own pricer over the
parameter bounds. Outputs, each on a scale where it is unbounded (``ln`` for ``v0, kappa,
theta, xi, sigma_j``, ``atanh(rho / RHO_MAX)`` for ``rho``, linear for ``lam, mu_j``): the
model's parameters; for the piecewise models ``theta, xi, rho`` at every grid tenor, read
at each fitted piece at ``sqrt(t_{j-1} t_j)`` (interpolated in ``ln T``). The result is
clipped to the model's bounds.

Weights: ``streamer/calib/nets/<model>.npz`` (package data, a few tens of kB each), loaded
once; a model without a file has no learned guess (``learned_guess`` returns None).

References:
    A. Hernandez, "Model calibration with neural networks", SSRN 2812140 (2016).
    B. Horvath, A. Muguruza, M. Tomas, "Deep learning volatility: a deep neural network
    perspective on pricing and calibration in (rough) volatility models", Quantitative
    Finance 21 (2021) 11-27.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from streamer.models.base import FitData, FloatArray, IntArray, Model

TENOR_DAYS = np.array([1.0, 2.0, 4.0, 7.0, 14.0, 30.0, 60.0, 91.0, 182.0, 365.0])
Z_FIT = 2.5  # quotes within this many ATM standard deviations shape the quadratic
RHO_MAX = 0.99
NETS = Path(__file__).resolve().parent / "nets"
# the scale each parameter is learned on
LOG_PARAMS = frozenset({"v0", "kappa", "theta", "xi", "sigma_j"})
ATANH_PARAMS = frozenset({"rho"})
PIECE_PARAMS = ("theta", "xi", "rho")


def n_features() -> int:
    return 3 * int(TENOR_DAYS.shape[0]) + 2


def slice_smiles(
    k: FloatArray, iv: FloatArray, slice_idx: IntArray, slice_T: FloatArray
) -> FloatArray:
    """Per slice ``(a, b, c)`` of the quadratic ``a + b z + c z^2`` (rows of NaN for a slice
    without a finite vol): every slice in a few array operations (``slice_smiles_loop``
    slice by slice, the reference, where a slice's normal equations are singular)."""
    S = slice_T.shape[0]
    ok = np.isfinite(iv)
    if S == 0 or not np.any(ok):
        return np.full((S, 3), np.nan)
    kk, vv, jj = k[ok], iv[ok], slice_idx[ok]
    n = np.bincount(jj, minlength=S)
    # a0: the median vol of the (up to) 4 quotes nearest the forward
    order = np.lexsort((np.abs(kk), jj))
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    take = first[:, None] + np.arange(4)[None, :]
    near = np.where(
        np.arange(4)[None, :] < n[:, None], vv[order][np.minimum(take, kk.size - 1)], np.nan
    )
    has = n > 0
    srt = np.sort(near, axis=1)  # NaN padding sorts last
    c = np.minimum(n, 4)
    rows = np.arange(S)
    lo_i, hi_i = np.maximum(c - 1, 0) // 2, c // 2
    a0 = np.where(has, 0.5 * (srt[rows, lo_i] + srt[rows, np.minimum(hi_i, 3)]), np.nan)
    sd = np.maximum(a0 * np.sqrt(slice_T), 1e-6)
    z = kk / sd[jj]
    use = np.abs(z) <= Z_FIT
    few = np.bincount(jj, weights=use.astype(np.float64), minlength=S) < 3
    use |= few[jj]
    zu, vu, ju = z[use], vv[use], jj[use]
    cnt = np.bincount(ju, minlength=S)
    hi_z = np.full(S, -np.inf)
    lo_z = np.full(S, np.inf)
    np.maximum.at(hi_z, ju, zu)
    np.minimum.at(lo_z, ju, zu)
    ptp = np.where(cnt > 0, hi_z - lo_z, 0.0)
    deg = np.where((cnt >= 3) & (ptp > 0.5), 2, np.where(ptp > 0.0, 1, 0))
    mom = np.stack([np.bincount(ju, weights=zu**p, minlength=S) for p in range(5)], axis=1)
    rhs = np.stack([np.bincount(ju, weights=vu * zu**p, minlength=S) for p in range(3)], axis=1)
    M = np.stack([mom[:, i : i + 3] for i in range(3)], axis=1)  # (S, 3, 3): sum z^(i+j)
    live = np.arange(3)[None, :] <= deg[:, None]
    both = live[:, :, None] & live[:, None, :]
    M = np.where(both, M, np.eye(3)[None, :, :])
    rhs = np.where(live, rhs, 0.0)
    try:
        coef = np.linalg.solve(M[has], rhs[has][:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        return slice_smiles_loop(k, iv, slice_idx, slice_T)
    out = np.full((S, 3), np.nan)
    out[has] = coef
    bad = has & ~(out[:, 0] > 0.0)
    out[bad] = np.stack([a0[bad], np.zeros(int(bad.sum())), np.zeros(int(bad.sum()))], axis=1)
    if not np.all(np.isfinite(out[has])):
        return slice_smiles_loop(k, iv, slice_idx, slice_T)
    return out


def slice_smiles_loop(
    k: FloatArray, iv: FloatArray, slice_idx: IntArray, slice_T: FloatArray
) -> FloatArray:
    """``slice_smiles`` slice by slice (least squares, any rank)."""
    S = slice_T.shape[0]
    out = np.full((S, 3), np.nan)
    for j in range(S):
        m = (slice_idx == j) & np.isfinite(iv)
        if not np.any(m):
            continue
        kj, vj = k[m], iv[m]
        near = np.argsort(np.abs(kj))[: max(2, min(4, kj.shape[0]))]
        a0 = float(np.median(vj[near]))
        sd = max(a0 * math.sqrt(float(slice_T[j])), 1e-6)
        z = kj / sd
        use = np.abs(z) <= Z_FIT
        if np.count_nonzero(use) < 3:
            use = np.ones(z.shape[0], dtype=np.bool_)
        z, v = z[use], vj[use]
        deg = 2 if z.shape[0] >= 3 and np.ptp(z) > 0.5 else (1 if np.ptp(z) > 0.0 else 0)
        A = np.vander(z, 3, increasing=True)[:, : deg + 1]
        coef = np.linalg.lstsq(A, v, rcond=None)[0]
        out[j, : deg + 1] = coef
        out[j, deg + 1 :] = 0.0
        if not out[j, 0] > 0.0:
            out[j] = (a0, 0.0, 0.0)
    return out


def smile_features(smiles: FloatArray, slice_T: FloatArray) -> FloatArray:
    """The feature vector of per-slice ``(a, b, c)`` at maturities ``slice_T``."""
    good = np.isfinite(smiles[:, 0]) & (smiles[:, 0] > 0.0) & (slice_T > 0.0)
    if not np.any(good):
        raise ValueError("no slice with a finite ATM vol")
    lt = np.log(slice_T[good])
    order = np.argsort(lt)
    lt = lt[order]
    sm = smiles[good][order]
    grid = np.log(TENOR_DAYS / 365.0)
    la = np.interp(grid, lt, np.log(sm[:, 0]))
    b = np.interp(grid, lt, sm[:, 1])
    c = np.interp(grid, lt, sm[:, 2])
    return np.concatenate([la, b, c, [lt[0], lt[-1]]])


def features(data: FitData) -> FloatArray:
    """The network's input for a prepared chain (``3 G + 2`` numbers)."""
    sm = slice_smiles(data.k, data.iv, data.slice_idx, data.slice_T)
    return smile_features(sm, data.slice_T)


def output_names(model: Model) -> tuple[str, ...]:
    """What a model's network predicts: its surface parameters, and for a piecewise model
    ``theta@g, xi@g, rho@g`` at every grid tenor ``g`` in their place."""
    names = model.param_names(1)
    out: list[str] = []
    for name in names:
        base = name.split("[", 1)[0]
        if name.endswith("]"):
            if base == PIECE_PARAMS[0]:
                out.extend(f"{p}@{g}" for g in range(TENOR_DAYS.shape[0]) for p in PIECE_PARAMS)
            elif base not in PIECE_PARAMS:
                raise ValueError(f"{model.name}: no learned layout for {name}")
        else:
            out.append(name)
    return tuple(out)


def encode(name: str, value: FloatArray) -> FloatArray:
    """A parameter on the scale it is learned on."""
    base = name.split("@", 1)[0]
    v = np.asarray(value, dtype=np.float64)
    if base in LOG_PARAMS:
        return np.asarray(np.log(np.maximum(v, 1e-12)))
    if base in ATANH_PARAMS:
        return np.asarray(np.arctanh(np.clip(v / RHO_MAX, -0.999999, 0.999999)))
    return v


def decode(name: str, value: FloatArray) -> FloatArray:
    base = name.split("@", 1)[0]
    v = np.asarray(value, dtype=np.float64)
    if base in LOG_PARAMS:
        return np.asarray(np.exp(np.clip(v, -30.0, 30.0)))
    if base in ATANH_PARAMS:
        return np.asarray(RHO_MAX * np.tanh(v))
    return v


@dataclass(frozen=True)
class Network:
    """A trained MLP: ``weights``/``biases`` per layer, input and output standardisation."""

    weights: tuple[FloatArray, ...]
    biases: tuple[FloatArray, ...]
    x_mean: FloatArray
    x_scale: FloatArray
    y_mean: FloatArray
    y_scale: FloatArray
    outputs: tuple[str, ...]

    def __call__(self, x: FloatArray) -> FloatArray:
        """Outputs (on their learned scales) for inputs ``x`` ``(n, n_features)`` or one row."""
        h = (np.atleast_2d(x) - self.x_mean) / self.x_scale
        last = len(self.weights) - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ W + b
            if i < last:
                h = np.tanh(h)
        out: FloatArray = h * self.y_scale + self.y_mean
        return out

    @property
    def n_weights(self) -> int:
        return sum(W.size + b.size for W, b in zip(self.weights, self.biases, strict=True))

    def save(self, path: Path, **meta: object) -> None:
        arrays: dict[str, object] = {
            f"W{i}": W.astype(np.float32) for i, W in enumerate(self.weights)
        }
        arrays.update({f"b{i}": b.astype(np.float32) for i, b in enumerate(self.biases)})
        arrays.update(
            x_mean=self.x_mean,
            x_scale=self.x_scale,
            y_mean=self.y_mean,
            y_scale=self.y_scale,
            outputs=np.array(self.outputs),
            tenor_days=TENOR_DAYS,
        )
        arrays.update({f"meta_{k}": np.asarray(v) for k, v in meta.items()})
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> Network:
        with np.load(path) as z:
            n = sum(1 for key in z.files if key.startswith("W"))
            if not np.array_equal(z["tenor_days"], TENOR_DAYS):
                raise ValueError(f"{path}: trained on another tenor grid")
            f32 = np.float64  # stored as float32, evaluated in float64
            return cls(
                weights=tuple(np.asarray(z[f"W{i}"], dtype=f32) for i in range(n)),
                biases=tuple(np.asarray(z[f"b{i}"], dtype=f32) for i in range(n)),
                x_mean=np.asarray(z["x_mean"], dtype=f32),
                x_scale=np.asarray(z["x_scale"], dtype=f32),
                y_mean=np.asarray(z["y_mean"], dtype=f32),
                y_scale=np.asarray(z["y_scale"], dtype=f32),
                outputs=tuple(str(s) for s in z["outputs"]),
            )


def net_path(model_name: str) -> Path:
    return NETS / f"{model_name}.npz"


@cache
def network(model_name: str) -> Network | None:
    """The shipped network of a model (None without one)."""
    path = net_path(model_name)
    return Network.load(path) if path.exists() else None


def to_vector(model: Model, outputs: dict[str, float], slice_T: FloatArray) -> FloatArray:
    """The model's parameter vector on ``slice_T`` from decoded network outputs."""
    S = slice_T.shape[0]
    names = model.param_names(S)
    lo, hi = model.bounds(S)
    grid = np.log(TENOR_DAYS / 365.0)
    prev = np.concatenate([[0.5 * slice_T[0]], slice_T[:-1]])
    rep = np.log(np.sqrt(np.maximum(prev, 1e-9) * slice_T))
    x = np.empty(len(names))
    for i, name in enumerate(names):
        base = name.split("[", 1)[0]
        if name.endswith("]"):
            j = int(name[name.index("[") + 1 : -1])
            col = [encode(base, np.array(outputs[f"{base}@{g}"])) for g in range(grid.shape[0])]
            x[i] = float(decode(base, np.interp(rep[j], grid, np.asarray(col, dtype=np.float64))))
        else:
            x[i] = outputs[name]
    return np.clip(x, lo, hi)


def learned_guess(model: Model, data: FitData) -> FloatArray | None:
    """The network's parameter vector for ``data`` (None: no network for this model, or no
    usable features)."""
    net = network(model.name)
    if net is None or data.n_slices == 0:
        return None
    try:
        f = features(data)
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not np.all(np.isfinite(f)):
        return None
    return learned_guess_from(model, f, data.slice_T)


def learned_guess_from(
    model: Model, f: FloatArray, slice_T: FloatArray, net: Network | None = None
) -> FloatArray | None:
    """The parameter vector of ``net`` (default: the model's shipped network) for features
    ``f`` of a chain with maturities ``slice_T`` (None without a network)."""
    net = net or network(model.name)
    if net is None:
        return None
    y = net(f)[0]
    outputs = {n: float(decode(n, np.array(v))) for n, v in zip(net.outputs, y, strict=True)}
    return to_vector(model, outputs, slice_T)
