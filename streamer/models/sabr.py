r"""SABR per expiry: Hagan et al. (2002) lognormal expansion with Obłój's (2008) correction.

Dynamics ``dF = alpha_t F^beta dW``, ``d alpha_t = nu alpha_t dZ``, ``dW dZ = rho dt``. The
forward is normalised to 1 (``K = e^k``), so ``alpha`` is in the units of a normalised
forward and, for ``beta = 1``, close to the ATM vol. Black implied vol::

    sigma_B(k) = nu (-k) / x(z) * [1 + ((1-beta)^2/24 alpha^2 K^(beta-1)
                                       + rho beta nu alpha / 4 K^((beta-1)/2)
                                       + (2 - 3 rho^2)/24 nu^2) T]
    z = nu (1 - K^(1-beta)) / (alpha (1 - beta))     (beta < 1),    z = -nu k / alpha  (beta = 1)
    x(z) = ln((sqrt(1 - 2 rho z + z^2) + z - rho) / (1 - rho))

This is Obłój's form ("Fine-tune your smile: correction to Hagan et al.", 2008): the leading
term uses ``z`` built from ``F^(1-beta) - K^(1-beta)`` rather than Hagan's ``(FK)^((1-beta)/2)
ln(F/K)``, which is exact as ``nu -> 0`` and better in the wings. At ``k = 0`` the ratio
``-nu k / x(z)`` tends to ``alpha``; a series ``z/x(z) = 1 - rho z/2 + ...`` is used near 0.

Parameters (per slice): ``alpha`` in [1e-3, 5], ``rho`` in [-0.999, 0.999], ``nu`` in
[1e-3, 25]; ``beta`` is fixed per model instance (config; default 1) and published as a
surface parameter. The expansion is not arbitrage-free far in the wings at long maturities;
``arbitrage`` checks the butterfly condition ``g(k) >= 0`` (Gatheral & Jacquier 2014) of its
total variance on +-4 ATM standard deviations, and the Lee wing bound there.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from numba import njit

from streamer.models.base import (
    KERNEL_SABR,
    FitData,
    FloatArray,
    ParamView,
    RowModel,
    Violation,
    register,
)

NAMES = ("alpha", "rho", "nu")
LOWER = np.array([1e-3, -0.999, 1e-3])
UPPER = np.array([5.0, 0.999, 25.0])
ARB_POINTS = 161  # the butterfly check's grid over +-4 ATM standard deviations


def sabr_vol(
    alpha: FloatArray, rho: FloatArray, nu: FloatArray, k: FloatArray, T: FloatArray, beta: float
) -> FloatArray:
    """Obłój-corrected Hagan lognormal vol, element-wise (F = 1, K = e^k)."""
    omb = 1.0 - beta
    if omb == 0.0:
        z = -nu * k / alpha
        lead = alpha * np.ones_like(k)
    else:
        # 1 - K^(1-beta) = -expm1((1-beta) k); -nu k / z = alpha (1-beta)(-k) / (1 - K^(1-b))
        one_minus = -np.expm1(omb * k)
        z = nu * one_minus / (alpha * omb)
        small_k = np.abs(k) < 1e-12
        safe = np.where(small_k, 1.0, one_minus)
        lead = np.where(small_k, alpha, alpha * omb * (-k) / safe)
    disc = np.sqrt(np.maximum(1.0 - 2.0 * rho * z + z * z, 0.0))
    xz = _x_of_z(z, rho, disc)
    small = np.abs(z) < 1e-7
    ratio = np.where(small, 1.0 - 0.5 * rho * z, z / np.where(small, 1.0, xz))
    Kb = np.exp((beta - 1.0) * k)  # K^(beta - 1)
    corr = (
        1.0
        + (
            omb * omb / 24.0 * alpha * alpha * Kb
            + 0.25 * rho * beta * nu * alpha * np.sqrt(Kb)
            + (2.0 - 3.0 * rho * rho) / 24.0 * nu * nu
        )
        * T
    )
    return np.asarray(lead * ratio * corr)


def _x_of_z(z: FloatArray, rho: FloatArray, disc: FloatArray) -> FloatArray:
    """``x(z) = ln((D + z - rho)/(1 - rho))`` as ``log1p((D - 1 + z)/(1 - rho))`` with
    ``D - 1 = (z^2 - 2 rho z)/(D + 1)``: no cancellation for small ``z``."""
    arg = ((z * z - 2.0 * rho * z) / (disc + 1.0) + z) / (1.0 - rho)
    return np.asarray(np.log1p(np.maximum(arg, -1.0 + 1e-300)))


SERIES_Z = 1e-5  # below it the kernel uses the series of z/x(z) (error O(z^3))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def sabr_row(x: FloatArray, k: float, T: float, beta: float, jac: FloatArray) -> float:
    """One point's IV (as ``sabr_vol``) and its analytic gradient in ``(alpha, rho, nu)``.

    With ``lead = alpha L(k)``, ``z = nu Z(k) / alpha`` and ``x(z)`` as above,
    ``dx/dz = 1 / D`` and ``dx/drho = 1/(1-rho) - (1 + z/D)/(D + z - rho)`` where
    ``D = sqrt(1 - 2 rho z + z^2)``; near ``z = 0`` the ratio ``z/x(z)`` is its series
    ``1 - rho z/2 + (1/6 - rho^2/4) z^2`` below ``SERIES_Z`` (``x`` itself through
    ``log1p``). The kernel of the calibrator's compiled Levenberg-Marquardt
    (``streamer.calib.kernel``).
    """
    alpha, rho, nu = float(x[0]), float(x[1]), float(x[2])
    omb = 1.0 - beta
    if omb == 0.0:
        zk = -k
        lead_k = 1.0
    else:
        one_minus = -math.expm1(omb * k)
        zk = one_minus / omb
        lead_k = 1.0 if abs(k) < 1e-12 else omb * (-k) / one_minus
    z = nu * zk / alpha
    disc = math.sqrt(max(1.0 - 2.0 * rho * z + z * z, 0.0))
    if abs(z) < SERIES_Z:
        c2 = 1.0 / 6.0 - 0.25 * rho * rho
        ratio = 1.0 - 0.5 * rho * z + c2 * z * z
        dr_dz = -0.5 * rho + 2.0 * c2 * z
        dr_drho = -0.5 * z - 0.5 * rho * z * z
    else:
        arg = ((z * z - 2.0 * rho * z) / (disc + 1.0) + z) / (1.0 - rho)
        xz = math.log1p(max(arg, -1.0 + 1e-300))
        ratio = z / xz
        dx_drho = 1.0 / (1.0 - rho) - (1.0 + z / disc) / (disc + z - rho)
        dr_dz = (xz - z / disc) / (xz * xz)
        dr_drho = -z * dx_drho / (xz * xz)
    if omb == 0.0:  # beta = 1: K^(beta-1) = 1
        c_a = 0.0
        c_x = 0.25
    else:
        kb = math.exp((beta - 1.0) * k)
        c_a = omb * omb / 24.0 * kb
        c_x = 0.25 * beta * math.sqrt(kb)
    c_n = (2.0 - 3.0 * rho * rho) / 24.0
    corr = 1.0 + (c_a * alpha * alpha + c_x * rho * nu * alpha + c_n * nu * nu) * T
    lead = alpha * lead_k
    jac[0] = (
        lead_k * ratio * corr
        - lead * dr_dz * z / alpha * corr
        + lead * ratio * (2.0 * c_a * alpha + c_x * rho * nu) * T
    )
    jac[1] = lead * dr_drho * corr + lead * ratio * (c_x * nu * alpha - 0.25 * rho * nu * nu) * T
    jac[2] = (
        lead * dr_dz * zk / alpha * corr + lead * ratio * (c_x * rho * alpha + 2.0 * c_n * nu) * T
    )
    return lead * ratio * corr


@register
class SABR(RowModel):
    """SABR per expiry slice; ``x = [alpha, rho, nu]``, ``beta`` fixed (default 1)."""

    name = "sabr"
    n_params = 3
    fd_floor = 1e-2
    kernel_kind = KERNEL_SABR
    # issue 13 (``streamer bench quality``, all shared chains): fit every two-sided quote a bot
    # may hold, the deep wings (|delta| < 0.01) and the expiries from 2 hours out (the daily)
    # included, let tight long-dated quotes weigh by their own spread (floor 0.1 vol point),
    # and turn robust beyond 0.3 half-spreads: a rigid family gives up the quotes it cannot
    # reach instead of bending away from the rest (in band 75.6% -> 77.4%, published
    # arbitrage findings 35 -> 3; the band objective lost 4.5 points here)
    calib_defaults: ClassVar[dict[str, object]] = {
        "f_scale": 0.3,
        # the daily's slices sat up to 2e-7 in total variance under the next expiry's at the
        # old tolerance (tests/test_calib_faults: published calendar arbitrage)
        "calendar_tol": 1e-9,
        "filters": {"min_abs_delta": 0.0, "min_T_days": 0.0833, "iv_floor": 0.001},
    }

    def __init__(self, beta: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"sabr beta must lie in [0, 1], got {beta}")
        self.beta = float(beta)

    @property
    def kernel_arg(self) -> float:
        return self.beta

    @classmethod
    def from_params(cls, surface_params: dict[str, float]) -> SABR:
        return cls(beta=float(surface_params.get("beta", 1.0)))

    def param_names(self, n_slices: int) -> tuple[str, ...]:
        return NAMES

    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        return LOWER.copy(), UPPER.copy()

    def iv_rows(self, rows: FloatArray, k: FloatArray, T: FloatArray) -> FloatArray:
        return sabr_vol(rows[:, 0], rows[:, 1], rows[:, 2], k, T, self.beta)

    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        k, iv = data.k, data.iv
        near = np.argsort(np.abs(k))[:2]
        atm = float(np.mean(iv[near])) if len(near) else 0.6
        T = float(data.slice_T[0]) if data.n_slices else 0.1
        alpha = atm  # beta = 1; for beta < 1 alpha is still ATM vol at F = 1
        # skew sign from a straight line through the smile
        slope = float(np.polyfit(k, iv, 1)[0]) if len(k) > 2 else 0.0
        rho0 = float(np.clip(np.sign(slope) * 0.3, -0.9, 0.9))
        nu0 = float(np.clip(0.6 / np.sqrt(max(T, 1e-3)), 0.3, 10.0))
        return [
            np.array([alpha, rho0, nu0]),
            np.array([alpha, -rho0, nu0 * 2.0]),
            np.array([alpha, 0.0, nu0 * 0.5]),
        ]

    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            return [Violation("nonfinite", 0, float("inf"), "non-finite parameters")]
        T = float(slice_T[0])
        sd = float(x[0]) * np.sqrt(T)
        k = np.linspace(-4.0 * sd, 4.0 * sd, ARB_POINTS)
        iv = self.implied_vol(x, k, np.full(k.shape, T), np.zeros(k.shape, dtype=np.int64))
        w = iv * iv * T
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            return [Violation("negative_variance", 0, 1.0, "non-positive total variance")]
        out: list[Violation] = []
        g = butterfly_g_numeric(k, w)
        gmin = float(np.min(g))
        if gmin < -1e-6:
            at = float(k[1:-1][int(np.argmin(g))])
            out.append(Violation("butterfly", 0, -gmin, f"g(k) = {gmin:.3g} at k = {at:.2f}"))
        return out

    def arbitrage_slices(self, X: FloatArray, slice_T: FloatArray) -> list[list[Violation]]:
        """All slices' butterfly grids in one evaluation; only slices with a finding go
        through ``arbitrage`` for the details."""
        X = np.asarray(X, dtype=np.float64)
        if not np.all(np.isfinite(X)):
            return super().arbitrage_slices(X, slice_T)
        S, G = X.shape[0], ARB_POINTS
        T = np.asarray(slice_T, dtype=np.float64)
        sd = X[:, 0] * np.sqrt(T)
        k = np.linspace(-4.0, 4.0, G)[None, :] * sd[:, None]
        TT = np.repeat(T, G)
        iv = self.iv_rows(np.repeat(X, G, axis=0), k.ravel(), TT)
        w = (iv * iv * TT).reshape(S, G)
        with np.errstate(invalid="ignore", divide="ignore"):
            g = butterfly_g_numeric(k, w)
        bad_w = ~np.all(np.isfinite(w) & (w > 0), axis=1)
        suspect = bad_w | ~(np.min(g, axis=1) >= -1e-6)
        return [list(self.arbitrage(X[j], T[j : j + 1])) if suspect[j] else [] for j in range(S)]

    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        return np.array([0.005, 0.03, 0.1])

    def slice_scales(self, slice_T: FloatArray) -> FloatArray:
        """``scale`` of every slice at once (the same values)."""
        return np.tile(np.array([0.005, 0.03, 0.1]), (len(slice_T), 1))

    plain_slice_view = True  # ``view`` adds only the surface-wide beta

    def view(self, x: FloatArray, n_slices: int) -> ParamView:
        v = super().view(x, n_slices)
        return ParamView(surface={"beta": self.beta}, slices=v.slices)


def butterfly_g_numeric(k: FloatArray, w: FloatArray) -> FloatArray:
    """Gatheral-Jacquier ``g`` at the inner grid points from central differences of ``w``,
    along the last axis (uniform grids; one per row for 2-D ``k``, ``w``)."""
    h = k[..., 1:2] - k[..., 0:1]
    w1 = (w[..., 2:] - w[..., :-2]) / (2.0 * h)
    w2 = (w[..., 2:] - 2.0 * w[..., 1:-1] + w[..., :-2]) / (h * h)
    wc, kc = w[..., 1:-1], k[..., 1:-1]
    return np.asarray(
        (1.0 - kc * w1 / (2.0 * wc)) ** 2 - 0.25 * w1 * w1 * (1.0 / wc + 0.25) + 0.5 * w2
    )
