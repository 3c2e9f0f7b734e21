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
from numba import njit

from streamer.calib.lm_steps import solve_small
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
    without a finite vol): every slice in one compiled pass (``_smiles``;
    ``slice_smiles_loop`` slice by slice, the reference, where a slice's normal equations
    are singular or a coefficient is not finite)."""
    S = slice_T.shape[0]
    if S == 0:
        return np.full((0, 3), np.nan)
    out, ok = _smiles(
        np.ascontiguousarray(k, dtype=np.float64),
        np.ascontiguousarray(iv, dtype=np.float64),
        np.ascontiguousarray(slice_idx, dtype=np.int64),
        np.ascontiguousarray(slice_T, dtype=np.float64),
        Z_FIT,
    )
    if not ok:
        return slice_smiles_loop(k, iv, slice_idx, slice_T)
    result: FloatArray = out
    return result


@njit(cache=True, nogil=True, error_model="numpy")
def _smiles(
    k: FloatArray, iv: FloatArray, slice_idx: IntArray, slice_T: FloatArray, z_fit: float
) -> tuple[FloatArray, bool]:
    """``slice_smiles`` per slice: ``a0`` the median vol of the (up to) 4 finite quotes
    nearest the forward (ties in ``|k|`` by order), ``z = k / max(a0 sqrt T, 1e-6)``, the
    quotes with ``|z| <= z_fit`` (all of them when fewer than 3), a quadratic (a line
    where they span under 0.5 in ``z``, a constant where they do not span) by its normal
    equations; ``a <= 0`` gives ``(a0, 0, 0)``. False when a system is singular or a
    coefficient not finite."""
    S = slice_T.shape[0]
    n = k.shape[0]
    out = np.full((S, 3), np.nan)
    near_k = np.empty(4)
    near_v = np.empty(4)
    M = np.empty((3, 3))
    rhs = np.empty(3)
    coef = np.empty(3)
    for j in range(S):
        m = 0  # the slice's finite quotes seen, and the 4 nearest |k| so far (sorted)
        for i in range(n):
            if slice_idx[i] != j or not math.isfinite(iv[i]):
                continue
            a = abs(k[i])
            pos = min(m, 4)
            while pos > 0 and near_k[pos - 1] > a:
                pos -= 1
            if pos < 4:
                last = min(m, 3)
                for q in range(last, pos, -1):
                    near_k[q] = near_k[q - 1]
                    near_v[q] = near_v[q - 1]
                near_k[pos] = a
                near_v[pos] = iv[i]
            m += 1
        if m == 0:
            continue
        c = min(m, 4)
        vals = np.sort(near_v[:c])
        a0 = 0.5 * (vals[(c - 1) // 2] + vals[c // 2])
        sd = max(a0 * math.sqrt(slice_T[j]), 1e-6)
        used = 0
        for i in range(n):
            if slice_idx[i] == j and math.isfinite(iv[i]) and abs(k[i] / sd) <= z_fit:
                used += 1
        every = used < 3
        mom = np.zeros(5)
        rhs[:] = 0.0
        cnt = 0
        lo_z = math.inf
        hi_z = -math.inf
        for i in range(n):
            if slice_idx[i] != j or not math.isfinite(iv[i]):
                continue
            z = k[i] / sd
            if not every and not abs(z) <= z_fit:
                continue
            cnt += 1
            lo_z = min(lo_z, z)
            hi_z = max(hi_z, z)
            zp = 1.0
            for p in range(5):
                mom[p] += zp
                if p < 3:
                    rhs[p] += iv[i] * zp
                zp *= z
        ptp = hi_z - lo_z if cnt > 0 else 0.0
        deg = 2 if (cnt >= 3 and ptp > 0.5) else (1 if ptp > 0.0 else 0)
        for r in range(3):
            for q in range(3):
                M[r, q] = mom[r + q] if (r <= deg and q <= deg) else (1.0 if r == q else 0.0)
            if r > deg:
                rhs[r] = 0.0
        if not solve_small(M, rhs, coef):
            return out, False
        if not coef[0] > 0.0:
            coef[0], coef[1], coef[2] = a0, 0.0, 0.0
        for q in range(3):
            if not math.isfinite(coef[q]):
                return out, False
            out[j, q] = coef[q]
    return out, True


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
