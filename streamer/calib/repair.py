"""Re-fit one slice of a per-expiry model with its no-arbitrage constraints enforced.

Used when a slice's unconstrained fit fails its checks (rare: the repair path is not
latency-critical). The slice is re-fitted with ``scipy.optimize.least_squares`` on its data
residuals plus hinge rows that vanish exactly when the constraints hold on a grid of ``k``:

* butterfly: ``mu * max(0, margin - g(k))`` with Gatheral & Jacquier's (2014) ``g`` of the slice's
  total variance, computed by central differences;
* calendar: ``mu * max(0, w_prev(k) - w(k)) / w_scale`` against the previous (shorter)
  accepted slice's total variance ``w_prev`` on the quoted range (``calendar_grid``).

The hinge weight ``mu`` grows until the constraints hold (or gives up after a few rounds).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.optimize as so

from streamer.models.base import FitData, FloatArray, Model
from streamer.models.sabr import butterfly_g_numeric

MU_ROUNDS = (1e2, 1e4, 1e6)
G_TOL = 1e-9
G_MARGIN = 2e-3  # the hinge aims at g >= margin: grid and difference errors stay covered


def check_grid(data: FitData, half_width: float = 3.0, n: int = 241) -> FloatArray:
    """Uniform grid for the butterfly check: +-3 and every fitted quote."""
    lo = min(-half_width, float(data.k.min()) - 0.1) if data.n_quotes else -half_width
    hi = max(half_width, float(data.k.max()) + 0.1) if data.n_quotes else half_width
    return np.linspace(lo, hi, n)


def total_variance(model: Model, x: FloatArray, k: FloatArray, T: float) -> FloatArray:
    Tk = np.full(k.shape, T)
    iv = model.implied_vol(x, k, Tk, np.zeros(k.shape, dtype=np.int64))
    return np.asarray(iv * iv * T)


def constraint_gaps(
    model: Model,
    x: FloatArray,
    k_bf: FloatArray,
    k_cal: FloatArray,
    T: float,
    w_prev: FloatArray | None,
    margin: float = 0.0,
) -> tuple[FloatArray, FloatArray]:
    """Butterfly shortfall ``max(0, -g)`` on ``k_bf`` and calendar shortfall on ``k_cal``."""
    w = total_variance(model, x, k_bf, T)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        return np.full(len(k_bf) - 2, 1.0), np.full(len(k_cal), 1.0)
    bf = np.maximum(margin - butterfly_g_numeric(k_bf, w), 0.0)
    if w_prev is None:
        return bf, np.zeros(len(k_cal))
    return bf, np.maximum(w_prev - total_variance(model, x, k_cal, T), 0.0)


def repair_slice(
    model: Model,
    x0: FloatArray,
    data: FitData,
    residual_fn: object,
    w_prev: FloatArray | None,
    k_bf: FloatArray,
    k_cal: FloatArray,
    calendar_tol: float,
) -> FloatArray | None:
    """Constrained re-fit of one slice; None when the constraints cannot be met."""
    T = float(data.slice_T[0])
    lo, hi = model.bounds(1)
    w_scale = max(float(np.median(data.iv)) ** 2 * T, 1e-8) * 0.01
    x = np.clip(np.asarray(x0, dtype=np.float64), lo, hi)
    assert callable(residual_fn)
    for mu in MU_ROUNDS:

        def fun(z: FloatArray, mu: float = mu) -> npt.NDArray[np.float64]:
            bf, cal = constraint_gaps(model, z, k_bf, k_cal, T, w_prev, G_MARGIN)
            r = np.asarray(residual_fn(z), dtype=np.float64)
            return np.concatenate([r, mu * bf, mu * cal / w_scale])

        try:
            res = so.least_squares(fun, x, bounds=(lo, hi), method="trf", max_nfev=200)
        except (ValueError, np.linalg.LinAlgError):
            return None
        x = res.x
        bf, cal = constraint_gaps(model, x, k_bf, k_cal, T, w_prev)
        if (
            float(bf.max(initial=0.0)) <= G_TOL
            and float(cal.max(initial=0.0)) <= calendar_tol
            and not model.arbitrage(x, data.slice_T)
        ):
            return np.asarray(x)
    return None
