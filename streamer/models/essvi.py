r"""eSSVI: SSVI slices with their own skew (Hendriks & Martini 2019; Mingone 2022).

Each expiry ``j`` is an SSVI smile with its own ATM total variance ``theta_j``, correlation
``rho_j`` and ``psi_j = theta_j phi_j``::

    w(k) = theta/2 * (1 + rho psi k / theta + sqrt((psi k / theta + rho)^2 + 1 - rho^2))

so ``rho`` and ``psi`` are functions of ``theta`` sampled at the listed expiries (the
"extended" SSVI). Fitted per slice as ``x = [theta, rho, z]`` with

    psi = z * PSI_SAFETY * min(4 / (1 + |rho|), sqrt(4 theta / (1 + |rho|))),   z in [0, 1],

which keeps every slice inside Gatheral & Jacquier's (2014, Theorem 4.2) sufficient butterfly
conditions ``psi (1 + |rho|) < 4`` and ``psi^2 (1 + |rho|) <= 4 theta`` by construction.
Calendar arbitrage between consecutive slices is checked *exactly, for every k* (the
two-slice problem of Hendriks & Martini 2019; the closed form below is derived here). With
``a = rho psi`` and ``c = psi^2 (1 - rho^2) / 4``, a slice's ``w(k)`` is the upper root of
``Q(k, w) = w^2 - (theta + a k) w - c k^2``. Slice 2 lies above slice 1 at ``k`` iff
``Q_2(k, w_1(k)) <= 0``, and on slice 1 ``Q_2 = Q_2 - Q_1 = -w_1^2 P(t)`` with ``t = k / w_1``::

    P(t) = (r - 1) + (a_2 - r a_1) t + (c_2 - r c_1) t^2,        r = theta_2 / theta_1.

Dividing ``Q_1 = 0`` by ``w_1^2`` gives ``c_1 t^2 + a_1 t - 1 = -theta_1/w_1 < 0``, so ``t``
runs over exactly ``(t_-, t_+) = (-2/(psi_1 - a_1), 2/(psi_1 + a_1))`` as ``k`` runs over the
real line (inside it by that inequality, all of it by continuity, as ``t -> t_+-`` for
``k -> +-inf``; the ends are the wings: ``P(t_+) >= 0`` iff the right wing slope
``psi (1 + rho) / 2`` does not fall from slice 1 to 2). The slices never cross iff
the quadratic ``P >= 0`` on that interval: its two ends and, when convex, its vertex
(``calendar_margin``). Inside the fit the calendar hinge rows sit on a grid of ``t`` mapped
to ``k = t theta_1 / (1 - a_1 t - c_1 t^2)`` (``essvi_calendar_grid``), which spans every
``k``; the calibrator's gate applies the exact test. Published per slice: ``theta``,
``rho``, ``psi``; gradients are analytic (``essvi_row``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamer.models.base import (
    KERNEL_ESSVI,
    FitData,
    FloatArray,
    ParamView,
    RowModel,
    Violation,
    register,
)

NAMES = ("theta", "rho", "z")
LOWER = np.array([1e-6, -0.999, 0.0])
UPPER = np.array([4.0, 0.999, 1.0])
PSI_SAFETY = 0.999


def psi_of(theta: FloatArray, rho: FloatArray, z: FloatArray) -> FloatArray:
    """``psi`` from the fitted ``z`` (see the module docstring)."""
    a = 1.0 + np.abs(rho)
    cap = np.minimum(4.0 / a, np.sqrt(4.0 * np.maximum(theta, 0.0) / a))
    return np.asarray(z * PSI_SAFETY * cap)


def total_variance(
    theta: FloatArray, rho: FloatArray, psi: FloatArray, k: FloatArray
) -> FloatArray:
    """eSSVI total variance at log-moneyness ``k``."""
    phi = psi / np.maximum(theta, 1e-300)
    q = phi * k + rho
    return np.asarray(0.5 * theta * (1.0 + rho * phi * k + np.sqrt(q * q + 1.0 - rho * rho)))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def essvi_row(x: FloatArray, k: float, T: float, jac: FloatArray) -> float:
    """One point's IV and its analytic gradient in ``(theta, rho, z)``.

    With ``R = sqrt(psi^2 k^2 + 2 rho theta psi k + theta^2)`` (``= theta sqrt(q^2 + 1 -
    rho^2)``), ``w = (theta + rho psi k + R) / 2``, so ``dw/dtheta = (1 + (rho psi k +
    theta)/R)/2``, ``dw/drho = psi k (1 + theta/R)/2``, ``dw/dpsi = (rho k + (psi k^2 + rho
    theta k)/R)/2``, and ``psi(theta, rho, z)`` through the active branch of its cap. The
    kernel of the calibrator's compiled Levenberg-Marquardt (``streamer.calib.kernel``).
    """
    theta, rho, zz = x[0], x[1], x[2]
    a = 1.0 + abs(rho)
    sgn = 1.0 if rho > 0.0 else (-1.0 if rho < 0.0 else 0.0)
    cap_lin = 4.0 / a
    cap_sq = math.sqrt(4.0 * max(theta, 0.0) / a)
    if cap_lin <= cap_sq:
        cap = cap_lin
        dcap_dth = 0.0
        dcap_drho = -4.0 / (a * a) * sgn
    else:
        cap = cap_sq
        dcap_dth = 0.5 * cap / theta if theta > 0.0 else 0.0
        dcap_drho = -0.5 * cap / a * sgn
    psi = zz * PSI_SAFETY * cap
    pk = psi * k
    r = math.sqrt(pk * pk + 2.0 * rho * theta * pk + theta * theta)
    w = 0.5 * (theta + rho * pk + r)
    iv = math.sqrt(max(w, 1e-14) / T)
    s = 0.5 / (T * iv)
    dw_dpsi = 0.5 * (rho * k + (pk * k + rho * theta * k) / r)
    jac[0] = (0.5 * (1.0 + (rho * pk + theta) / r) + dw_dpsi * zz * PSI_SAFETY * dcap_dth) * s
    jac[1] = (0.5 * pk * (1.0 + theta / r) + dw_dpsi * zz * PSI_SAFETY * dcap_drho) * s
    jac[2] = dw_dpsi * PSI_SAFETY * cap * s
    return iv


def _slope_terms(x: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """``theta, a = rho psi, c = psi^2 (1 - rho^2)/4, psi`` of rows ``(theta, rho, z)``."""
    theta, rho, z = x[..., 0], x[..., 1], x[..., 2]
    psi = psi_of(theta, rho, z)
    return theta, rho * psi, 0.25 * psi * psi * (1.0 - rho * rho), psi


def calendar_margin(prev: FloatArray, cur: FloatArray) -> FloatArray:
    """``min P(t)`` over ``[t_-, t_+]`` (module docstring) for slice pairs: parameter rows
    ``(theta, rho, z)`` of the shorter (``prev``) and longer (``cur``) expiry. The pair is
    free of calendar arbitrage for every ``k`` iff the margin is ``>= 0``."""
    th1, a1, c1, psi1 = _slope_terms(np.asarray(prev, dtype=np.float64))
    th2, a2, c2, _ = _slope_terms(np.asarray(cur, dtype=np.float64))
    r = th2 / th1
    A, B, C = c2 - r * c1, a2 - r * a1, r - 1.0
    lo = -2.0 / np.maximum(psi1 - a1, 1e-300)
    hi = 2.0 / np.maximum(psi1 + a1, 1e-300)
    with np.errstate(over="ignore", invalid="ignore"):
        ends = np.minimum(C + B * lo + A * lo * lo, C + B * hi + A * hi * hi)
        tv = np.where(A > 0.0, -B / np.where(A > 0.0, 2.0 * A, 1.0), 0.0)
        inside = (A > 0.0) & (tv > lo) & (tv < hi)
        vertex = np.where(inside, C - B * B / np.where(A > 0.0, 4.0 * A, 1.0), np.inf)
    m = np.minimum(ends, vertex)
    return np.asarray(np.where(np.isnan(m), -np.inf, m))  # degenerate (psi = 0): a finding


ANCHOR_LIFT = 1.001  # calendar_repair's anchor: the shorter slice scaled up by this
K_CAL_MAX = 10.0  # the grid's far ends (beyond, only the exact wing test speaks)


@njit(cache=True, nogil=True, error_model="numpy")
def essvi_calendar_grid(x_prev: FloatArray, out: FloatArray) -> None:
    """Log-moneyness points ``k(t)`` for ``t`` uniform inside ``(t_-, t_+)`` of the slice
    ``x_prev`` (module docstring): a grid over the whole real line, dense where the smile
    bends; clipped to ``+-K_CAL_MAX``."""
    theta, rho, zz = x_prev[0], x_prev[1], x_prev[2]
    a_ = 1.0 + abs(rho)
    psi = zz * PSI_SAFETY * min(4.0 / a_, math.sqrt(4.0 * max(theta, 0.0) / a_))
    a = rho * psi
    c = 0.25 * psi * psi * (1.0 - rho * rho)
    lo = -2.0 / max(psi - a, 1e-12)
    hi = 2.0 / max(psi + a, 1e-12)
    n = out.shape[0]
    for i in range(n):
        t = lo + (hi - lo) * (i + 1.0) / (n + 1.0)
        den = 1.0 - a * t - c * t * t
        k = t * theta / den if den > 0.0 else (K_CAL_MAX if t > 0.0 else -K_CAL_MAX)
        out[i] = min(max(k, -K_CAL_MAX), K_CAL_MAX)


def _iv(rows: FloatArray, k: FloatArray, T: FloatArray) -> FloatArray:
    th, rho, z = rows[:, 0], rows[:, 1], rows[:, 2]
    w = total_variance(th, rho, psi_of(th, rho, z), k)
    return np.asarray(np.sqrt(np.maximum(w, 1e-14) / T))


@register
class ESSVI(RowModel):
    """eSSVI slice by slice: ``x = [theta, rho, z]`` per expiry."""

    name = "essvi"
    n_params = 3
    kernel_kind = KERNEL_ESSVI
    exact_calendar = True

    def param_names(self, n_slices: int) -> tuple[str, ...]:
        return NAMES

    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        return LOWER.copy(), UPPER.copy()

    def iv_rows(self, rows: FloatArray, k: FloatArray, T: FloatArray) -> FloatArray:
        return _iv(rows, k, T)

    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        k, iv = data.k, data.iv
        T = float(data.slice_T[0]) if data.n_slices else 0.1
        near = np.argsort(np.abs(k))[:2]
        atm = float(np.mean(iv[near])) if len(near) else 0.6
        theta = max(atm * atm * T, 1e-6)
        slope = float(np.polyfit(k, iv, 1)[0]) if len(k) > 2 else 0.0
        rho0 = float(np.clip(np.sign(slope) * 0.3, -0.9, 0.9))
        return [
            np.array([theta, rho0, 0.5]),
            np.array([theta, -rho0, 0.3]),
            np.array([theta, 0.0, 0.8]),
        ]

    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            return [Violation("nonfinite", 0, float("inf"), "non-finite parameters")]
        out: list[Violation] = []
        theta, rho, z = (float(v) for v in x)
        if theta <= 0.0:
            out.append(Violation("negative_variance", 0, -theta, "theta <= 0"))
        if abs(rho) >= 1.0 or not 0.0 <= z <= 1.0:
            out.append(Violation("ssvi_bound", 0, max(abs(rho) - 1.0, z - 1.0, -z), "bounds"))
        psi = float(psi_of(np.array(theta), np.array(rho), np.array(z)))
        a = 1.0 + abs(rho)
        if psi * a >= 4.0 or psi * psi * a > 4.0 * theta * (1.0 + 1e-12):
            out.append(Violation("butterfly", 0, psi * a - 4.0, "GJ Theorem 4.2 bounds"))
        return out

    def calendar_shortfall(self, prev: FloatArray, cur: FloatArray) -> FloatArray:
        """``max(0, -calendar_margin)`` for slice pairs (0: no crossing at any ``k``)."""
        return np.asarray(np.maximum(-calendar_margin(prev, cur), 0.0))

    def calendar_repair(self, x_prev: FloatArray, x: FloatArray) -> FloatArray:
        """The point nearest ``x`` on the segment to an anchor strictly above ``x_prev``.

        ``w`` is homogeneous of degree one in ``(theta, a, psi)`` and increasing in
        ``theta``, so the anchor ``(max(theta, s theta_prev), rho_prev, s psi_prev)`` with
        ``s = ANCHOR_LIFT`` lies above ``s w_prev > w_prev`` everywhere, wings included;
        bisection on the segment (the margin is continuous along it) finds the last
        crossing-free point."""
        x_prev = np.asarray(x_prev, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        if calendar_margin(x_prev, x) >= 0.0:
            return x
        theta = max(float(x[0]), float(x_prev[0]) * ANCHOR_LIFT)
        psi = ANCHOR_LIFT * float(psi_of(x_prev[0], x_prev[1], x_prev[2]))
        cap = float(psi_of(np.array(theta), x_prev[1], np.array(1.0)))
        anchor = np.array([theta, x_prev[1], min(psi / cap, 1.0) if cap > 0 else 0.0])
        lo, hi = 0.0, 1.0  # hi: crossing-free
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if calendar_margin(x_prev, (1.0 - mid) * x + mid * anchor) >= 0.0:
                hi = mid
            else:
                lo = mid
        return np.asarray((1.0 - hi) * x + hi * anchor)

    def calendar_grid(self, x_prev: FloatArray, n: int) -> FloatArray:
        out = np.empty(n)
        essvi_calendar_grid(np.asarray(x_prev, dtype=np.float64), out)
        return out

    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        T = float(slice_T[0]) if slice_T is not None and len(slice_T) else 0.1
        return np.array([0.006 * T, 0.03, 0.03])

    def view(self, x: FloatArray, n_slices: int) -> ParamView:
        theta, rho, z = (float(v) for v in np.asarray(x, dtype=np.float64))
        psi = float(psi_of(np.array(theta), np.array(rho), np.array(z)))
        return ParamView(surface={}, slices=[{"theta": theta, "rho": rho, "psi": psi}])

    def from_view(self, view: ParamView, n_slices: int) -> FloatArray:
        p = view.slices[0]
        theta, rho, psi = float(p["theta"]), float(p["rho"]), float(p["psi"])
        cap = float(psi_of(np.array(theta), np.array(rho), np.array(1.0)))
        return np.array([theta, rho, psi / cap if cap > 0 else 0.0])
