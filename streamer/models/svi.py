r"""Raw SVI, one slice per expiry (Gatheral 2004; Gatheral & Jacquier 2014).

Total implied variance at log-moneyness ``k = ln(K/F)``::

    w(k) = a + b * (rho * (k - m) + sqrt((k - m)^2 + sigma^2)),     iv(k) = sqrt(w(k) / T)

Parameters and bounds (per slice): ``a`` in [-1, 4] (level), ``b`` in [0, 2] (wing slope),
``rho`` in [-0.999, 0.999] (skew), ``m`` in [-2, 2] (shift), ``sigma`` in [1e-4, 3] (ATM
curvature).

No-arbitrage conditions checked by ``arbitrage`` (on a dense grid of ``k``):

* positive variance: ``min w = a + b sigma sqrt(1 - rho^2) >= 0``;
* Roger Lee's moment formula (Lee 2004): wing slopes ``b (1 +- rho) <= 2``;
* butterfly (Gatheral & Jacquier 2014, Lemma 2.2): the density is non-negative iff
  ``g(k) = (1 - k w'/(2w))^2 - w'^2/4 (1/w + 1/4) + w''/2 >= 0``;
* calendar (across slices, ``calendar_violations``): ``w_{j+1}(k) >= w_j(k)`` for every k.

Cold start: the quasi-explicit method of Zeliade (2009): for fixed ``(m, sigma)``, ``w`` is
linear in ``(a, b sigma, b rho sigma)`` with ``y = (k - m)/sigma``::

    w = a + d y + c sqrt(y^2 + 1),    c = b sigma,  d = rho b sigma

so a weighted linear least-squares solve per grid point of ``(m, sigma)`` gives the inner
parameters; the best grid points seed the non-linear fit. Analytic Jacobian::

    dw/da = 1,  dw/db = rho (k-m) + R,  dw/drho = b (k-m),  dw/dm = -b (rho + (k-m)/R),
    dw/dsigma = b sigma / R,  with R = sqrt((k-m)^2 + sigma^2),  d iv/dx = (dw/dx) / (2 T iv).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from numba import njit

from streamer.models.base import (
    KERNEL_SVI,
    FitData,
    FloatArray,
    IntArray,
    Model,
    Violation,
    register,
)

NAMES = ("a", "b", "rho", "m", "sigma")
LOWER = np.array([-1.0, 0.0, -0.999, -2.0, 1e-4])
UPPER = np.array([4.0, 2.0, 0.999, 2.0, 3.0])
GRID_K = np.linspace(-3.0, 3.0, 241)
_M_GRID = np.array([-0.3, -0.15, -0.05, 0.0, 0.05, 0.15, 0.3])
_S_GRID = np.array([0.02, 0.05, 0.1, 0.2, 0.4, 0.8])
VAR_FLOOR = 1e-10
_FINE = np.linspace(-10.0, 10.0, 201)  # around the vertex, in units of sigma


def total_variance(x: FloatArray, k: FloatArray) -> FloatArray:
    """``w(k)`` for one slice's parameters (or per-point parameter rows ``x[:, 0..4]``)."""
    a, b, rho, m, sigma = (x[..., i] for i in range(5))
    d = k - m
    return np.asarray(a + b * (rho * d + np.sqrt(d * d + sigma * sigma)))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def svi_row(x: FloatArray, k: float, T: float, jac: FloatArray) -> float:
    """One point's IV and ``d iv / d x`` (into ``jac``): the scalar kernel of the calibrator's
    compiled Levenberg-Marquardt (``streamer.calib.kernel``); same formulas as
    ``SVI.block_jacobian``."""
    a, b, rho, m, sigma = x[0], x[1], x[2], x[3], x[4]
    d = k - m
    r = math.sqrt(d * d + sigma * sigma)
    w = max(a + b * (rho * d + r), VAR_FLOOR)
    iv = math.sqrt(w / T)
    s = 0.5 / (T * iv)
    jac[0] = s
    jac[1] = (rho * d + r) * s
    jac[2] = b * d * s
    jac[3] = -b * (rho + d / r) * s
    jac[4] = b * sigma / r * s
    return iv


def _w_derivatives(x: FloatArray, k: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    a, b, rho, m, sigma = (float(v) for v in x)
    d = k - m
    r = np.sqrt(d * d + sigma * sigma)
    w = a + b * (rho * d + r)
    w1 = b * (rho + d / r)
    w2 = b * sigma * sigma / (r * r * r)
    return w, w1, w2


def butterfly_g(x: FloatArray, k: FloatArray) -> FloatArray:
    """Gatheral-Jacquier's ``g(k)``; the slice is butterfly-free iff ``g >= 0`` everywhere."""
    w, w1, w2 = _w_derivatives(x, k)
    w = np.maximum(w, VAR_FLOOR)
    return np.asarray(
        (1.0 - k * w1 / (2.0 * w)) ** 2 - 0.25 * w1 * w1 * (1.0 / w + 0.25) + 0.5 * w2
    )


@njit(cache=True, nogil=True, error_model="numpy")
def _suspect_slices(X: FloatArray, grid: FloatArray, fine: FloatArray) -> np.ndarray:
    """Per slice row of ``X``: may it carry arbitrage? The butterfly ``g`` below ``-1e-9``
    on ``grid`` or on ``fine`` (in units of ``max(sigma, 1e-3)`` around ``m``), negative
    minimum variance, or Lee's bound broken (the same arithmetic, point by point, as the
    array expressions it replaced)."""
    S = X.shape[0]
    out = np.zeros(S, dtype=np.bool_)
    n_g = grid.shape[0]
    for j in range(S):
        a, b, rho, m, sigma = X[j, 0], X[j, 1], X[j, 2], X[j, 3], X[j, 4]
        width = max(sigma, 1e-3)
        gmin = math.inf
        for i in range(n_g + fine.shape[0]):
            k = grid[i] if i < n_g else m + width * fine[i - n_g]
            d = k - m
            r = math.sqrt(d * d + sigma * sigma)
            w = max(a + b * (rho * d + r), VAR_FLOOR)
            w1 = b * (rho + d / r)
            w2 = b * sigma * sigma / (r * r * r)
            t = 1.0 - k * w1 / (2.0 * w)
            g = t * t - 0.25 * w1 * w1 * (1.0 / w + 0.25) + 0.5 * w2
            if math.isnan(g) or g < gmin:  # a NaN stays (np.min propagates it)
                gmin = g
        wmin = a + b * sigma * math.sqrt(max(1.0 - rho * rho, 0.0))
        lee = b * (1.0 + abs(rho))
        out[j] = gmin < -1e-9 or wmin < 0.0 or lee > 2.0 + 1e-12  # NaN g: as np.min, not suspect
    return out


def slice_violations(x: FloatArray, j: int, k_grid: FloatArray = GRID_K) -> list[Violation]:
    """Positive variance, Lee's wing bound and the butterfly condition of one slice."""
    out: list[Violation] = []
    a, b, rho, _m, sigma = (float(v) for v in x)
    if not np.all(np.isfinite(x)):
        return [Violation("nonfinite", j, float("inf"), "non-finite parameters")]
    wmin = a + b * sigma * np.sqrt(max(1.0 - rho * rho, 0.0))
    if wmin < 0.0:
        out.append(Violation("negative_variance", j, -wmin, f"min w = {wmin:.3g}"))
    lee = b * (1.0 + abs(rho))
    if lee > 2.0 + 1e-12:
        out.append(Violation("lee_wing", j, lee - 2.0, f"b(1+|rho|) = {lee:.4g} > 2"))
    # plus a fine grid around the vertex: short-dated smiles bend within a few sigma of m
    width = max(float(sigma), 1e-3)
    k_all = np.concatenate([k_grid, float(x[3]) + width * _FINE])
    g = butterfly_g(x, k_all)
    gmin = float(np.min(g))
    if gmin < -1e-9:
        at = float(k_all[int(np.argmin(g))])
        out.append(Violation("butterfly", j, -gmin, f"g(k) = {gmin:.3g} at k = {at:.2f}"))
    return out


def calendar_violations(
    w_slices: list[FloatArray], first_index: int = 0, tol: float = 1e-9
) -> list[Violation]:
    """Total variance must not decrease in T: ``w_slices[j+1] >= w_slices[j]`` on the grid."""
    out: list[Violation] = []
    for j in range(1, len(w_slices)):
        gap = float(np.max(w_slices[j - 1] - w_slices[j]))
        if gap > tol:
            out.append(
                Violation(
                    "calendar",
                    first_index + j,
                    gap,
                    f"w falls by up to {gap:.3g} from slice {j - 1} to {j}",
                )
            )
    return out


@register
class SVI(Model):
    """Raw SVI per expiry slice; ``x = [a, b, rho, m, sigma]``."""

    name = "svi"
    per_expiry = True
    n_params = 5
    kernel_kind = KERNEL_SVI
    # issue 13 (``streamer bench quality``, all shared chains): fit every two-sided quote a bot
    # may hold, the deep wings (|delta| < 0.01) and the expiries from 2 hours out (the daily)
    # included, let tight long-dated quotes weigh by their own spread (floor 0.1 vol point),
    # count only what lies beyond the band, and turn robust beyond 0.3 half-spreads
    # (in band 93.1% -> 95.5%, published arbitrage findings 74 -> 42)
    calib_defaults: ClassVar[dict[str, object]] = {
        "objective": "band",
        "f_scale": 0.3,
        "filters": {"min_abs_delta": 0.0, "min_T_days": 0.0833, "iv_floor": 0.001},
    }

    def param_names(self, n_slices: int) -> tuple[str, ...]:
        return NAMES

    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        return LOWER.copy(), UPPER.copy()

    def implied_vol(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        w = total_variance(np.asarray(x, dtype=np.float64), np.asarray(k, dtype=np.float64))
        return np.asarray(np.sqrt(np.maximum(w, VAR_FLOOR) / T))

    def jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        rows = np.broadcast_to(np.asarray(x, dtype=np.float64), (len(k), 5))
        return self.block_jacobian(rows, k, T)[1]

    def iv_rows(self, rows: FloatArray, k: FloatArray, T: FloatArray) -> FloatArray:
        """IVs with one parameter row per point."""
        return np.asarray(np.sqrt(np.maximum(total_variance(rows, k), VAR_FLOOR) / T))

    def block_jacobian(
        self, rows: FloatArray, k: FloatArray, T: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """IVs and ``d iv / d x`` with one parameter row per point (vectorised over slices)."""
        a, b, rho, m, sigma = (rows[:, i] for i in range(5))
        d = k - m
        r = np.sqrt(d * d + sigma * sigma)
        w = np.maximum(a + b * (rho * d + r), VAR_FLOOR)
        iv = np.sqrt(w / T)
        jac = np.empty((len(k), 5))
        jac[:, 0] = 1.0
        jac[:, 1] = rho * d + r
        jac[:, 2] = b * d
        jac[:, 3] = -b * (rho + d / r)
        jac[:, 4] = b * sigma / r
        jac *= (0.5 / (T * iv))[:, None]
        return iv, jac

    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        """Quasi-explicit (Zeliade 2009) on a grid of ``(m, sigma)``; best three first."""
        k, w = data.k, data.iv * data.iv * data.T
        T = float(data.slice_T[0]) if data.n_slices else float(np.median(data.T))
        wt = data.weight * data.weight
        m0 = float(k[int(np.argmin(w))]) if len(k) else 0.0
        mm, ss = np.meshgrid(np.append(_M_GRID, m0), _S_GRID * max(np.sqrt(T), 0.05) * 2.0)
        mm, ss = mm.ravel(), ss.ravel()
        y = (k[None, :] - mm[:, None]) / ss[:, None]  # (grid, n)
        design = np.stack([np.ones_like(y), y, np.sqrt(y * y + 1.0)], axis=2)  # (grid, n, 3)
        lhs = np.einsum("gni,gnj->gij", design * wt[None, :, None], design)
        rhs = np.einsum("gni,n->gi", design, w * wt)
        try:
            sol = np.linalg.solve(lhs + 1e-14 * np.eye(3), rhs[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            sol = np.full((len(mm), 3), np.nan)
        a, d, c = sol[:, 0], sol[:, 1], np.maximum(sol[:, 2], 1e-8)
        rho = np.clip(d / c, -0.99, 0.99)
        b = np.minimum(c / ss, 1.99 / (1.0 + np.abs(rho)))
        X = np.clip(np.stack([a, b, rho, mm, ss], axis=1), LOWER, UPPER)
        resid = (total_variance(X[:, None, :], k[None, :]) - w[None, :]) / np.maximum(T, 1e-12)
        err = np.sum(wt[None, :] * resid * resid, axis=1)
        err = np.where(np.isfinite(err), err, np.inf)
        order = np.argsort(err)
        good = [X[i] for i in order[:3] if np.isfinite(err[i])]
        if not good:
            atm = float(np.nanmedian(w)) if len(w) else 0.04 * T
            return [np.clip(np.array([atm, 0.1, -0.3, 0.0, 0.1]), LOWER, UPPER)]
        return good

    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        return slice_violations(np.asarray(x, dtype=np.float64), 0)

    def arbitrage_slices(self, X: FloatArray, slice_T: FloatArray) -> list[list[Violation]]:
        """All slices at once: the butterfly ``g`` on every slice's grids in one pass; only
        slices with a finding go through ``slice_violations`` for the details."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        if not np.all(np.isfinite(X)):
            return [slice_violations(X[j], j) for j in range(X.shape[0])]
        suspect = _suspect_slices(X, GRID_K, _FINE).tolist()
        return [slice_violations(X[j], 0) if suspect[j] else [] for j in range(X.shape[0])]

    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        """Penalty scales: level ``a`` in total variance (0.5 vol point at 60% vol over T)."""
        T = float(slice_T[0]) if slice_T is not None and len(slice_T) else 0.1
        return np.array([0.006 * T, 0.02 * np.sqrt(T), 0.03, 0.02 * np.sqrt(T), 0.02 * np.sqrt(T)])

    def slice_scales(self, slice_T: FloatArray) -> FloatArray:
        """``scale`` of every slice at once (the same values)."""
        T = np.asarray(slice_T, dtype=np.float64)
        r = 0.02 * np.sqrt(T)
        return np.column_stack([0.006 * T, r, np.full(len(T), 0.03), r, r])
