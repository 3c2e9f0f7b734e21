r"""An arbitrage-free cubic B-spline smile per expiry, in total implied variance.

Total implied variance ``w(k)`` at log-moneyness ``k = ln(K/F)`` is a uniform cubic B-spline
in the coordinate ``y = asinh(k / s)`` (knots evenly spaced in ``y``: dense around the money at
the scale ``s``, about 1.5 ATM standard deviations ``sqrt(w_atm)``, and spreading out
logarithmically in the wings) between outer knots ``k_l < 0 < k_r``, and linear in ``k``
beyond them::

    w(k) = sum_{i=-1}^{n+1} c_i B_i(y(k))                         k_l <= k <= k_r
    w(k) = w(k_l) + b_l (k_l - k),    w(k) = w(k_r) + b_r (k - k_r)   outside,

so the published IVs are ``sqrt(w / T)``. The smoothing-spline fit to the bid-ask band follows
Fengler (2009), "Arbitrage-free smoothing of the implied volatility surface" (Quantitative
Finance 9(4)): a cubic spline in total variance with a roughness penalty and the no-arbitrage
conditions as constraints of the same least-squares problem; here the constraints enter as
hinge rows of the calibrator's Levenberg-Marquardt (``streamer.calib.kernel``) and the
spline lives in variance against log-moneyness, as in Le Floc'h & Oosterlee's (2019)
arbitrage-free collocation, rather than in prices.

Parameters (``x``, per slice, ``N_INT = 8`` knot intervals):

* ``c0 .. c8``: B-spline coefficients ``c_0 .. c_n`` (total variance, about the spline's value
  at each knot), in ``[1e-8, 4]``: positive coefficients keep ``w > 0`` (the convex-hull
  property of B-splines); the end coefficients follow from the wing slopes,
  ``c_{-1} = c_1 + 2 h b_l dk/dy(y_l)``, ``c_{n+1} = c_{n-1} + 2 h b_r dk/dy(y_r)``, so the
  spline meets its linear wings with a continuous slope;
* ``bl``, ``br``: the wing slopes ``|dw/dk|`` in ``[0, 1.98]``: within Roger Lee's (2004)
  moment bound (slope < 2) by the box itself;
* ``s``, ``yl``, ``yr``: the knot map (scale, and the outer knots in ``y``:
  ``k_l = s sinh(y_l)``, ``k_r = s sinh(y_r)``), set by the cold start from the slice's quotes
  (ATM vol, quoted range) and *frozen*: their gradient is zero, so no fit moves them and the
  coefficients keep their meaning from fit to fit (what the warm start and the change penalty
  need); a regime (cold) fit sets them afresh.

Butterfly (Gatheral & Jacquier 2014, Lemma 2.2; Durrleman's condition): the density is
non-negative iff ``g(k) = (1 - k w'/(2w))^2 - w'^2/4 (1/w + 1/4) + w''/2 >= 0``, with
``w'``, ``w''`` analytic (chain rule through ``y(k)``). The fit's hinge rows sit at four points
per knot interval and at the wings' worst points (just outside the outer knots: ``w''``
jumps to 0 there); ``arbitrage`` checks 24 points per interval
and the wings exactly: on a linear wing ``w = alpha + u`` (``u = b |k|``),
``16 w^2 g = (4 - b^2) u^2 + (16 alpha - 4 b^2 - 2 alpha b^2) u + 16 alpha^2 - 4 b^2 alpha
- b^2 alpha^2``, a convex quadratic whose minimum over the wing is explicit.

The roughness rows (inside the fit, with the hinge rows) are Fengler's curvature penalty at the
knots, ``rho_r w_kk(t_i) (h dk/dy)^2 / s^2``, which for uniform cubic B-splines is
``rho_r (c_{i-1} - 2 c_i + c_{i+1} - h tanh(t_i) (c_{i+1} - c_{i-1}) / 2) / s^2``: it decides
the coefficients no quote pins down and bends them towards straight lines in ``k``.

Calendar: the quoted-range check between neighbouring slices (``exact_calendar`` is False).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from numba import njit

from streamer.models.base import (
    KERNEL_SPLINE,
    FitData,
    FloatArray,
    RowModel,
    Violation,
    register,
)
from streamer.pricing import full_shape

N_INT = 8  # knot intervals
NC = N_INT + 1  # free coefficients c_0 .. c_n
I_BL, I_BR, I_S, I_YL, I_YR = NC, NC + 1, NC + 2, NC + 3, NC + 4
N_PARAMS = NC + 5
NAMES = (*(f"c{i}" for i in range(NC)), "bl", "br", "s", "yl", "yr")
MAX_SLOPE = 1.98  # Lee: |dw/dk| < 2 in the wings
LOWER = np.array([1e-8] * NC + [0.0, 0.0, 1e-4, -20.0, 1e-6])
UPPER = np.array([4.0] * NC + [MAX_SLOPE, MAX_SLOPE, 10.0, -1e-6, 20.0])
VAR_FLOOR = 1e-12
SCALE_MULT = 1.5  # s = SCALE_MULT * ATM total vol
MIN_HALF_RANGE = 1.0  # outer knots at least this many s from the money
# and this many s beyond the outermost quotes: room for the spline to bend into its linear wing
KNOT_MARGIN = 0.5
ROUGHNESS = 0.3  # rho_r
HINGE_PER_INT = 8  # butterfly hinge points per knot interval
N_HINGE_GRID = HINGE_PER_INT * N_INT + 1  # the hinge grid's points
N_HINGE_BF = N_HINGE_GRID + 2  # plus each wing's worst point
N_HINGE_ROUGH = NC
N_HINGE = N_HINGE_BF + N_HINGE_ROUGH
CHECK_PER_INT = 24  # ``arbitrage``: points per knot interval
BUTTERFLY_TOL = 1e-6
REFINE_BELOW = 0.1  # grid points with g below it are refined (``refine``)
REFINE_SUB = 6
# the hinge rows: mu * max(0, margin - g), stiffer than the generic ones (constraints.py): a
# wiggly short-dated smile pulls hard, and the scipy repair is the slow path
HINGE_MU = 3000.0
HINGE_MARGIN = 2e-3
# calendar rows against the shorter neighbour (kernel): mu * max(0, w_prev + margin - w) / W_SCALE,
# margin CAL_ABS + CAL_REL * w_prev
CAL_MU = 300.0
CAL_ABS = 2e-6
CAL_REL = 2e-3


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _geometry(x: FloatArray) -> tuple[float, float, float]:
    """``(y_l, h, s)``: the knot map's left end (in ``y``), step and scale."""
    s = x[I_S]
    yl = x[I_YL]
    return yl, (x[I_YR] - yl) / N_INT, s


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _end(x: FloatArray, right: bool) -> tuple[float, float]:
    """``(k, e)`` of an outer knot: its log-moneyness and the end-coefficient factor
    ``2 h dk/dy`` there."""
    yl, h, s = _geometry(x)
    y = x[I_YR] if right else yl
    return s * math.sinh(y), 2.0 * h * s * math.cosh(y)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _factors(x: FloatArray, i: int) -> tuple[float, float]:
    """The end factors an interval ``i`` needs (its coefficients reach ``c_-1`` or
    ``c_n+1`` only in the first and last interval)."""
    e_l = _end(x, False)[1] if i == 0 else 0.0
    e_r = _end(x, True)[1] if i == N_INT - 1 else 0.0
    return e_l, e_r


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _coef(x: FloatArray, j: int, e_l: float, e_r: float) -> float:
    """Coefficient ``c_j`` for ``j`` in ``-1 .. n+1`` (the ends from the wing slopes)."""
    if j == -1:
        return float(x[1] + e_l * x[I_BL])
    if j == N_INT + 1:
        return float(x[N_INT - 1] + e_r * x[I_BR])
    return float(x[j])


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _add(j: int, v: float, e_l: float, e_r: float, out: FloatArray) -> None:
    """Add ``v`` times coefficient ``c_j`` (``j`` in ``-1 .. n+1``) to the gradient ``out``."""
    if j == -1:
        out[1] += v
        out[I_BL] += v * e_l
    elif j == N_INT + 1:
        out[N_INT - 1] += v
        out[I_BR] += v * e_r
    else:
        out[j] += v


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _locate(t: float) -> tuple[int, float]:
    i = min(max(math.floor(t), 0), N_INT - 1)
    return i, t - i


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _bases(u: float) -> tuple[float, float, float, float]:
    u2 = u * u
    om = 1.0 - u
    return (
        om * om * om / 6.0,
        (3.0 * u2 * u - 6.0 * u2 + 4.0) / 6.0,
        (-3.0 * u2 * u + 3.0 * u2 + 3.0 * u + 1.0) / 6.0,
        u2 * u / 6.0,
    )


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _dbases(
    u: float,
) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """The bases' first and second derivatives in ``u``."""
    om = 1.0 - u
    u2 = u * u
    return (
        (-0.5 * om * om, 1.5 * u2 - 2.0 * u, -1.5 * u2 + u + 0.5, 0.5 * u2),
        (om, 3.0 * u - 2.0, 1.0 - 3.0 * u, u),
    )


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _point_exp(y: float, s: float, h: float) -> tuple[float, float, float]:
    """``(k, a1, a3)`` at knot coordinate ``y``: ``k = s sinh(y)``, and the chain-rule
    factors ``dw/dk = a1 dw/du``, ``d2w/dk2 = a1^2 d2w/du2 + a3 dw/du``; ``sinh`` and
    ``cosh`` from one ``exp`` (``k`` within ~1e-16 ``s`` of ``s * math.sinh(y)``: for grid
    points strictly inside the outer knots, where no side has to be decided)."""
    e = math.exp(y)
    ei = 1.0 / e
    k = 0.5 * s * (e - ei)
    ky = 0.5 * s * (e + ei)  # dk/dy
    return k, 1.0 / (ky * h), -k / (ky * ky * ky) / h


# the knot map's constants of one slice, computed once (``spline_knots``):
# y_l, h, s, y_r, k_l, e_l, k_r, e_r (``_geometry``, ``_end``)
Knots = tuple[float, float, float, float, float, float, float, float]


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _interior_w012(
    x: FloatArray, i: int, u: float, e_l: float, e_r: float, k: float, s: float, h: float
) -> tuple[float, float, float]:
    """``(w, dw/dk, d2w/dk2)`` inside the knots: interval ``i`` at ``u`` in [0, 1) (the
    outer knots' factors ``e_l``, ``e_r``; ``k = s sinh y``, knot spacing ``h`` in ``y``)."""
    c0 = _coef(x, i - 1, e_l, e_r)
    c1 = _coef(x, i, e_l, e_r)
    c2 = _coef(x, i + 1, e_l, e_r)
    c3 = _coef(x, i + 2, e_l, e_r)
    b0, b1, b2, b3 = _bases(u)
    om = 1.0 - u
    u2 = u * u
    w = c0 * b0 + c1 * b1 + c2 * b2 + c3 * b3
    wu = (
        -0.5 * om * om * c0 + (1.5 * u2 - 2.0 * u) * c1 + (-1.5 * u2 + u + 0.5) * c2 + 0.5 * u2 * c3
    )
    wuu = om * c0 + (3.0 * u - 2.0) * c1 + (1.0 - 3.0 * u) * c2 + u * c3
    ky = math.sqrt(k * k + s * s)  # dk/dy
    a1 = 1.0 / (ky * h)
    return w, a1 * wu, a1 * a1 * wuu - k / (ky * ky * ky) / h * wu


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def spline_knots(x: FloatArray) -> Knots:
    """``(y_l, h, s, y_r, k_l, e_l, k_r, e_r)``: what ``spline_w012`` recomputes at every
    point (the outer knots' ``sinh`` and ``cosh``), for loops over many points of a slice."""
    yl, h, s = _geometry(x)
    kl, e_l = _end(x, False)
    kr, e_r = _end(x, True)
    return yl, h, s, x[I_YR], kl, e_l, kr, e_r


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def w012_knots(x: FloatArray, kn: Knots, k: float) -> tuple[float, float, float]:
    """``spline_w012(x, k)`` from the slice's ``spline_knots``: the same arithmetic (and
    values), without the outer knots' ``sinh``/``cosh`` per point. (``_coef`` reads
    ``e_l``/``e_r`` only in the first/last interval, so passing both always is the same.)"""
    yl, h, s, yr, kl, e_l, kr, e_r = kn
    y = math.asinh(k / s)
    if y < yl:
        bl = x[I_BL]
        return (4.0 * x[0] + 2.0 * x[1] + e_l * bl) / 6.0 + bl * (kl - k), -bl, 0.0
    if y > yr:
        br = x[I_BR]
        return (2.0 * x[N_INT - 1] + 4.0 * x[N_INT] + e_r * br) / 6.0 + br * (k - kr), br, 0.0
    i, u = _locate((y - yl) / h)
    return _interior_w012(x, i, u, e_l, e_r, k, s, h)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def iv_knots(x: FloatArray, kn: Knots, k: float, T: float) -> float:
    """``spline_iv`` from the slice's ``spline_knots`` (the same value)."""
    return math.sqrt(max(w012_knots(x, kn, k)[0], VAR_FLOOR) / T)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _g_knots(x: FloatArray, kn: Knots, k: float) -> float:
    """``g_at`` from the slice's ``spline_knots``."""
    w, w1, w2 = w012_knots(x, kn, k)
    if not w > 0.0:
        return -math.inf
    g = g_of(k, w, w1, w2)
    return g if math.isfinite(g) else -math.inf


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def wgrad_knots(x: FloatArray, kn: Knots, k: float, gw: FloatArray) -> float:
    """``spline_wgrad(x, k, gw)`` from the slice's ``spline_knots`` (the same arithmetic)."""
    for q in range(N_PARAMS):
        gw[q] = 0.0
    yl, h, s, yr, kl, e_l, kr, e_r = kn
    y = math.asinh(k / s)
    if y < yl:
        bl = x[I_BL]
        d = kl - k
        gw[0] = 4.0 / 6.0
        gw[1] = 2.0 / 6.0
        gw[I_BL] = e_l / 6.0 + d
        return float((4.0 * x[0] + 2.0 * x[1] + e_l * bl) / 6.0 + bl * d)
    if y > yr:
        br = x[I_BR]
        d = k - kr
        gw[N_INT - 1] = 2.0 / 6.0
        gw[N_INT] = 4.0 / 6.0
        gw[I_BR] = e_r / 6.0 + d
        return float((2.0 * x[N_INT - 1] + 4.0 * x[N_INT] + e_r * br) / 6.0 + br * d)
    i, u = _locate((y - yl) / h)
    b0, b1, b2, b3 = _bases(u)
    _add(i - 1, b0, e_l, e_r, gw)
    _add(i, b1, e_l, e_r, gw)
    _add(i + 1, b2, e_l, e_r, gw)
    _add(i + 2, b3, e_l, e_r, gw)
    return (
        _coef(x, i - 1, e_l, e_r) * b0
        + _coef(x, i, e_l, e_r) * b1
        + _coef(x, i + 1, e_l, e_r) * b2
        + _coef(x, i + 2, e_l, e_r) * b3
    )


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _w012_coefs(c: FloatArray, u: float, a1: float, a3: float) -> tuple[float, float, float]:
    """``(w, w', w'')`` at position ``u`` of a knot interval from its four coefficients
    ``c`` (chain-rule factors from ``_point_exp``): a grid point whose interval is known
    needs no ``asinh``."""
    b = _bases(u)
    d, dd = _dbases(u)
    w = 0.0
    wu = 0.0
    wuu = 0.0
    for m in range(4):
        w += b[m] * c[m]
        wu += d[m] * c[m]
        wuu += dd[m] * c[m]
    return w, a1 * wu, a1 * a1 * wuu + a3 * wu


@njit(cache=True, nogil=True, error_model="numpy")
def spline_w012(x: FloatArray, k: float) -> tuple[float, float, float]:
    """``(w, dw/dk, d2w/dk2)`` at ``k`` (values only)."""
    yl, h, s = _geometry(x)
    y = math.asinh(k / s)
    if y < yl:
        kl, e_l = _end(x, False)
        bl = x[I_BL]
        return (4.0 * x[0] + 2.0 * x[1] + e_l * bl) / 6.0 + bl * (kl - k), -bl, 0.0
    if y > x[I_YR]:
        kr, e_r = _end(x, True)
        br = x[I_BR]
        return (2.0 * x[N_INT - 1] + 4.0 * x[N_INT] + e_r * br) / 6.0 + br * (k - kr), br, 0.0
    i, u = _locate((y - yl) / h)
    e_l, e_r = _factors(x, i)
    return _interior_w012(x, i, u, e_l, e_r, k, s, h)


@njit(cache=True, nogil=True, error_model="numpy")
def spline_wgrad(x: FloatArray, k: float, gw: FloatArray) -> float:
    """``w(k)``, its gradient in ``x`` into ``gw`` (exact: ``w`` is linear in the
    coefficients and slopes; zero for ``s``, ``yl``, ``yr``)."""
    for q in range(N_PARAMS):
        gw[q] = 0.0
    yl, h, s = _geometry(x)
    y = math.asinh(k / s)
    if y < yl:  # value at knot 0: (c_-1 + 4 c_0 + c_1) / 6
        kl, e_l = _end(x, False)
        bl = x[I_BL]
        d = kl - k
        gw[0] = 4.0 / 6.0
        gw[1] = 2.0 / 6.0
        gw[I_BL] = e_l / 6.0 + d
        return float((4.0 * x[0] + 2.0 * x[1] + e_l * bl) / 6.0 + bl * d)
    if y > x[I_YR]:
        kr, e_r = _end(x, True)
        br = x[I_BR]
        d = k - kr
        gw[N_INT - 1] = 2.0 / 6.0
        gw[N_INT] = 4.0 / 6.0
        gw[I_BR] = e_r / 6.0 + d
        return float((2.0 * x[N_INT - 1] + 4.0 * x[N_INT] + e_r * br) / 6.0 + br * d)
    i, u = _locate((y - yl) / h)
    e_l, e_r = _factors(x, i)
    b0, b1, b2, b3 = _bases(u)
    _add(i - 1, b0, e_l, e_r, gw)
    _add(i, b1, e_l, e_r, gw)
    _add(i + 1, b2, e_l, e_r, gw)
    _add(i + 2, b3, e_l, e_r, gw)
    return (
        _coef(x, i - 1, e_l, e_r) * b0
        + _coef(x, i, e_l, e_r) * b1
        + _coef(x, i + 1, e_l, e_r) * b2
        + _coef(x, i + 2, e_l, e_r) * b3
    )


@njit(cache=True, nogil=True, error_model="numpy")
def spline_eval(
    x: FloatArray, k: float, gw: FloatArray, g1: FloatArray, g2: FloatArray
) -> tuple[float, float, float]:
    """``(w, dw/dk, d2w/dk2)`` at ``k``; their gradients in ``x`` into ``gw``, ``g1``, ``g2``."""
    w = spline_wgrad(x, k, gw)
    for q in range(N_PARAMS):
        g1[q] = 0.0
        g2[q] = 0.0
    yl, h, s = _geometry(x)
    y = math.asinh(k / s)
    if y < yl:
        g1[I_BL] = -1.0
        return w, -x[I_BL], 0.0
    if y > x[I_YR]:
        g1[I_BR] = 1.0
        return w, x[I_BR], 0.0
    i, u = _locate((y - yl) / h)
    e_l, e_r = _factors(x, i)
    om = 1.0 - u
    u2 = u * u
    ky = math.sqrt(k * k + s * s)
    a1 = 1.0 / (ky * h)  # dw/dk = a1 dw/du; d2w/dk2 = a1^2 d2w/du2 + a3 dw/du
    a2 = a1 * a1
    a3 = -k / (ky * ky * ky) / h
    d = (-0.5 * om * om, 1.5 * u2 - 2.0 * u, -1.5 * u2 + u + 0.5, 0.5 * u2)
    dd = (om, 3.0 * u - 2.0, 1.0 - 3.0 * u, u)
    w1 = 0.0
    w2 = 0.0
    for m in range(4):
        c = _coef(x, i - 1 + m, e_l, e_r)
        v1 = a1 * d[m]
        v2 = a2 * dd[m] + a3 * d[m]
        w1 += v1 * c
        w2 += v2 * c
        _add(i - 1 + m, v1, e_l, e_r, g1)
        _add(i - 1 + m, v2, e_l, e_r, g2)
    return w, w1, w2


@njit(cache=True, nogil=True, error_model="numpy")
def spline_row(x: FloatArray, k: float, T: float, jac: FloatArray) -> float:
    """One point's IV and ``d iv / d x`` (into ``jac``): the row kernel of the calibrator's
    compiled Levenberg-Marquardt (``streamer.calib.kernel``)."""
    w = spline_wgrad(x, k, jac)
    v = math.sqrt(max(w, VAR_FLOOR) / T)
    f = 0.5 / (T * v)
    for q in range(NC + 2):
        jac[q] *= f
    return v


@njit(cache=True, nogil=True, error_model="numpy")
def spline_iv(x: FloatArray, k: float, T: float) -> float:
    """One point's IV (no gradient): ``spline_row``'s value."""
    return math.sqrt(max(spline_w012(x, k)[0], VAR_FLOOR) / T)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def g_of(k: float, w: float, w1: float, w2: float) -> float:
    """Gatheral-Jacquier's ``g`` from ``w``, ``w'``, ``w''`` at ``k``."""
    a = 1.0 - k * w1 / (2.0 * w)
    return a * a - 0.25 * w1 * w1 * (1.0 / w + 0.25) + 0.5 * w2


@njit(cache=True, nogil=True, error_model="numpy")
def g_at(x: FloatArray, k: float) -> float:
    """``g(k)`` (``-inf`` where ``w <= 0`` or not finite)."""
    w, w1, w2 = spline_w012(x, k)
    if not w > 0.0:
        return -math.inf
    g = g_of(k, w, w1, w2)
    return g if math.isfinite(g) else -math.inf


@njit(cache=True, nogil=True, error_model="numpy")
def _wing(x: FloatArray, kn: Knots, right: bool) -> tuple[float, float]:
    """A linear wing's ``(k, min 16 w^2 g / w0^2)``: where the convex quadratic ``16 w^2 g``
    in ``u = b |k|`` is smallest over the wing (just outside the outer knot, where
    ``w''`` is 0, when the minimum is there) and its value (``w0``: the knot's ``w``;
    ``kn``: ``x``'s ``spline_knots``)."""
    k0 = kn[6] if right else kn[4]
    b = x[I_BR] if right else x[I_BL]
    nudge = 1e-9 * x[I_S]
    w0 = w012_knots(x, kn, k0)[0]
    if b <= 0.0:
        return (k0 + nudge if right else k0 - nudge), 16.0
    u0 = b * abs(k0)
    alpha = w0 - u0
    q2 = 4.0 - b * b
    q1 = 16.0 * alpha - 4.0 * b * b - 2.0 * alpha * b * b
    q0 = 16.0 * alpha * alpha - 4.0 * b * b * alpha - b * b * alpha * alpha
    u = max(u0, -q1 / (2.0 * q2))
    q = (q2 * u * u + q1 * u + q0) / (w0 * w0)
    return (u / b + nudge if right else -u / b - nudge), q


@njit(cache=True, nogil=True, error_model="numpy")
def refine(
    x: FloatArray, kn: Knots, ks: FloatArray, gs: FloatArray, threshold: float, n_sub: int
) -> None:
    """Where ``g`` on the grid ``ks`` (values ``gs``) is below ``threshold``, move the point to
    the smallest ``g`` of ``n_sub`` sub-points towards each neighbour (``g`` of a smile near
    its bound swings within a fraction of a grid step: its slope carries ``w''/w``; ``kn``:
    ``x``'s ``spline_knots``)."""
    n = ks.shape[0]
    prev = ks[0]
    for i in range(n):
        here = ks[i]
        nxt = ks[i + 1] if i + 1 < n else here
        if gs[i] < threshold:
            best_k, best_g = here, gs[i]
            for m in range(1, n_sub + 1):
                f = m / (n_sub + 1)
                for k in (here + (prev - here) * f, here + (nxt - here) * f):
                    g = _g_knots(x, kn, k)  # g_at's value
                    if g < best_g:
                        best_k, best_g = k, g
            ks[i] = best_k
            gs[i] = best_g
        prev = here


@njit(cache=True, nogil=True, error_model="numpy")
def spline_hinges(
    x: FloatArray,
    margin: float,
    mu: float,
    roughness: float,
    rows: FloatArray,
    ejac: FloatArray,
    at: int,
) -> int:
    """Butterfly hinge rows ``mu max(0, margin - g)`` at ``HINGE_PER_INT`` points per knot
    interval (each near-binding point moved to its neighbourhood's worst, ``refine``) and at
    each wing's worst point, with analytic ``g`` and gradient (at a moved point: the envelope
    theorem), then the roughness rows; written from row ``at``, returns the next."""
    p = N_PARAMS
    gw = np.empty(p)
    g1 = np.empty(p)
    g2 = np.empty(p)
    m = N_HINGE_GRID
    ks = np.empty(N_HINGE_BF)
    gs = np.empty(N_HINGE_BF)
    yl, h, s = _geometry(x)
    kn = spline_knots(x)
    for i in range(m):
        ks[i] = s * math.sinh(yl + h * i / HINGE_PER_INT)
        gs[i] = g_at(x, ks[i])
    refine(x, kn, ks[:m], gs[:m], REFINE_BELOW, REFINE_SUB)
    ks[m] = _wing(x, kn, False)[0]
    ks[m + 1] = _wing(x, kn, True)[0]
    gs[m] = g_at(x, ks[m])
    gs[m + 1] = g_at(x, ks[m + 1])
    for j in range(N_HINGE_BF):
        if gs[j] < margin:
            w, w1, w2 = spline_eval(x, ks[j], gw, g1, g2)
            _hinge_row(ks[j], w, w1, w2, gw, g1, g2, margin, mu, rows, ejac, at)
        else:
            _zero_row(rows, ejac, at)
        at += 1
    return spline_roughness(x, roughness, rows, ejac, at)


@njit(cache=True, nogil=True, error_model="numpy")
def _hinge_row(
    k: float,
    w: float,
    w1: float,
    w2: float,
    rw: FloatArray,
    r1: FloatArray,
    r2: FloatArray,
    margin: float,
    mu: float,
    rows: FloatArray,
    ejac: FloatArray,
    at: int,
) -> None:
    """Row ``at``: the hinge ``mu (margin - g(k))`` of Durrleman's ``g`` from ``w, w', w''``
    at ``k`` and its gradient from their parameter gradients ``rw, r1, r2``."""
    wc = max(w, 1e-12)
    a = 1.0 - k * w1 / (2.0 * wc)
    g = a * a - 0.25 * w1 * w1 * (1.0 / wc + 0.25) + 0.5 * w2
    rows[at] = mu * (margin - g)
    dg_dw = a * k * w1 / (wc * wc) + 0.25 * w1 * w1 / (wc * wc)
    dg_dw1 = -a * k / wc - 0.5 * w1 * (1.0 / wc + 0.25)
    for q in range(N_PARAMS):
        ejac[at, q] = -mu * (dg_dw * rw[q] + dg_dw1 * r1[q] + 0.5 * r2[q])


@njit(cache=True, nogil=True, error_model="numpy")
def _zero_row(rows: FloatArray, ejac: FloatArray, at: int) -> None:
    rows[at] = 0.0
    for q in range(N_PARAMS):
        ejac[at, q] = 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def spline_roughness(
    x: FloatArray, roughness: float, rows: FloatArray, ejac: FloatArray, at: int
) -> int:
    """The roughness rows (Fengler's curvature penalty at the knots, see the module
    docstring), written from row ``at``: ``rows = ejac @ x``, ``ejac`` fixed by the knot
    map; returns the next row."""
    p = N_PARAMS
    yl, h, s = _geometry(x)
    e_l = _end(x, False)[1]
    e_r = _end(x, True)[1]
    f = roughness / (s * s)
    for i in range(NC):
        for q in range(p):
            ejac[at, q] = 0.0
        th = 0.5 * h * math.tanh(yl + h * i)
        _add(i - 1, f * (1.0 + th), e_l, e_r, ejac[at])
        _add(i, -2.0 * f, e_l, e_r, ejac[at])
        _add(i + 1, f * (1.0 - th), e_l, e_r, ejac[at])
        r = 0.0
        for q in range(NC + 2):
            r += ejac[at, q] * x[q]
        rows[at] = r
        at += 1
    return at


# -- the fit's fixed geometry ---------------------------------------------------------------
# The knot map (s, yl, yr) is frozen during a fit (its gradient is zero) and w, w', w'' are
# linear in the coefficients and slopes: at a fixed k each is a fixed row times x. The
# compiled LM (``streamer.calib.kernel``) builds these rows once per slice run
# (``spline_design``, ``spline_geometry``) instead of locating every point in the knot grid
# (an asinh, and a sinh and cosh at the ends) at every evaluation; same values up to rounding.


@njit(cache=True, nogil=True, error_model="numpy")
def spline_design(x: FloatArray, k: FloatArray, out: FloatArray) -> None:
    """``out[i] = dw/dx`` at ``k[i]`` under ``x``'s knot map: ``w(k[i]) = out[i] @ x``."""
    kn = spline_knots(x)
    for i in range(k.shape[0]):
        wgrad_knots(x, kn, k[i], out[i])


@njit(cache=True, nogil=True, error_model="numpy")
def spline_geometry(
    x: FloatArray,
    kh: FloatArray,
    hw: FloatArray,
    h1: FloatArray,
    h2: FloatArray,
    rough: FloatArray,
) -> None:
    """The hinge grid of ``spline_hinges`` under ``x``'s knot map: its ``HINGE_PER_INT``
    points per interval (``kh``, ``N_HINGE_GRID`` of them), the rows of ``w``, ``w'``,
    ``w''`` there (``hw``, ``h1``, ``h2``), and the roughness rows' matrix at roughness 1
    (``rough``, ``(NC, N_PARAMS)``)."""
    yl, h, s = _geometry(x)
    for j in range(kh.shape[0]):
        t = j / HINGE_PER_INT
        i = min(j // HINGE_PER_INT, N_INT - 1)
        y = yl + h * j / HINGE_PER_INT
        if j == 0 or j == kh.shape[0] - 1:  # on an outer knot: the side ``spline_eval`` takes
            kh[j] = s * math.sinh(y)  # as ``spline_hinges``
            spline_eval(x, kh[j], hw[j], h1[j], h2[j])
            continue
        k, a1, a3 = _point_exp(y, s, h)
        kh[j] = k
        e_l, e_r = _factors(x, i)
        u = t - i
        b = _bases(u)
        d, dd = _dbases(u)
        for q in range(N_PARAMS):
            hw[j, q] = 0.0
            h1[j, q] = 0.0
            h2[j, q] = 0.0
        for m in range(4):
            _add(i - 1 + m, b[m], e_l, e_r, hw[j])
            _add(i - 1 + m, a1 * d[m], e_l, e_r, h1[j])
            _add(i - 1 + m, a1 * a1 * dd[m] + a3 * d[m], e_l, e_r, h2[j])
    spline_roughness(x, 1.0, np.empty(NC), rough, 0)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _dot(d: FloatArray, x: FloatArray) -> float:
    """``d @ x`` over the coefficients and slopes (a row's knot-map entries are 0)."""
    v = 0.0
    for q in range(NC + 2):
        v += d[q] * x[q]
    return v


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def spline_row_design(x: FloatArray, d: FloatArray, T: float, jac: FloatArray) -> float:
    """``spline_row`` from the point's design row ``d`` (``spline_design``)."""
    w = _dot(d, x)
    v = math.sqrt(max(w, VAR_FLOOR) / T)
    f = 0.5 / (T * v)
    for q in range(NC + 2):
        jac[q] = d[q] * f
    for q in range(NC + 2, N_PARAMS):
        jac[q] = 0.0
    return v


@njit(cache=True, nogil=True, error_model="numpy")
def spline_hinges_fixed(
    x: FloatArray,
    kh: FloatArray,
    hw: FloatArray,
    h1: FloatArray,
    h2: FloatArray,
    rough: FloatArray,
    margin: float,
    mu: float,
    roughness: float,
    rows: FloatArray,
    ejac: FloatArray,
    at: int,
) -> int:
    """``spline_hinges`` on the fixed geometry of ``spline_geometry`` (``x``'s knot map
    must be the one it was built under): ``g`` at the grid points from their rows; the
    refined points and the wings' worst points as there."""
    work = np.empty((5, max(N_HINGE_BF, N_PARAMS)))
    return hinges_fixed_into(
        x, spline_knots(x), kh, hw, h1, h2, rough, margin, mu, roughness, rows, ejac, at, work
    )


@njit(cache=True, nogil=True, error_model="numpy")
def hinges_fixed_into(
    x: FloatArray,
    kn: Knots,
    kh: FloatArray,
    hw: FloatArray,
    h1: FloatArray,
    h2: FloatArray,
    rough: FloatArray,
    margin: float,
    mu: float,
    roughness: float,
    rows: FloatArray,
    ejac: FloatArray,
    at: int,
    work: FloatArray,
) -> int:
    """``spline_hinges_fixed`` with ``x``'s ``spline_knots`` given and its scratch in
    ``work`` (``(5, max(N_HINGE_BF, N_PARAMS))``): nothing allocated (the compiled LM
    calls it once per slice and evaluation)."""
    p = N_PARAMS
    ks, gs = work[0, :N_HINGE_BF], work[1, :N_HINGE_BF]
    gw, g1, g2 = work[2, :p], work[3, :p], work[4, :p]
    m = N_HINGE_GRID
    for i in range(m):
        ks[i] = kh[i]
        w = _dot(hw[i], x)
        g = g_of(kh[i], w, _dot(h1[i], x), _dot(h2[i], x)) if w > 0.0 else -math.inf
        gs[i] = g if math.isfinite(g) else -math.inf
    refine(x, kn, ks[:m], gs[:m], REFINE_BELOW, REFINE_SUB)
    ks[m] = _wing(x, kn, False)[0]
    ks[m + 1] = _wing(x, kn, True)[0]
    gs[m] = _g_knots(x, kn, ks[m])
    gs[m + 1] = _g_knots(x, kn, ks[m + 1])
    for j in range(N_HINGE_BF):
        if gs[j] < margin:
            k = ks[j]
            if j < m and k == kh[j]:  # not moved by ``refine``: the fixed rows
                rw, r1, r2 = hw[j], h1[j], h2[j]
                w, w1, w2 = _dot(rw, x), _dot(r1, x), _dot(r2, x)
            else:
                w, w1, w2 = spline_eval(x, k, gw, g1, g2)
                rw, r1, r2 = gw, g1, g2
            _hinge_row(k, w, w1, w2, rw, r1, r2, margin, mu, rows, ejac, at)
        else:
            _zero_row(rows, ejac, at)
        at += 1
    for i in range(NC):
        r = 0.0
        for q in range(p):
            ejac[at, q] = roughness * rough[i, q]
            r += ejac[at, q] * x[q]
        rows[at] = r
        at += 1
    return at


@njit(cache=True, nogil=True, error_model="numpy")
def spline_rows_iv(X: FloatArray, k: FloatArray, T: FloatArray) -> FloatArray:
    """IVs with parameter row ``X[i]`` at ``(k[i], T[i])``."""
    out = np.empty(k.shape[0])
    for i in range(k.shape[0]):
        out[i] = math.sqrt(max(spline_w012(X[i], k[i])[0], VAR_FLOOR) / T[i])
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def spline_rows_jac(X: FloatArray, k: FloatArray, T: FloatArray) -> tuple[FloatArray, FloatArray]:
    """IVs and ``d iv / d x`` with one parameter row per point."""
    out = np.empty(k.shape[0])
    jac = np.empty((k.shape[0], N_PARAMS))
    tmp = np.empty(N_PARAMS)
    for i in range(k.shape[0]):
        out[i] = spline_row(X[i], k[i], T[i], tmp)
        jac[i, :] = tmp
    return out, jac


@njit(cache=True, nogil=True, error_model="numpy")
def check_slices(X: FloatArray) -> FloatArray:
    """The butterfly check of every slice row of ``X``: ``(S, 5)`` rows of (min ``g``, its
    ``k``, min ``w``, min of the wings' ``16 w^2 g / w0^2``, 1.0 if the slice passes every
    check of ``_check`` else 0.0) on ``CHECK_PER_INT`` points per knot interval (refined
    near the bound) and the wings exactly. Inside an interval ``e^y`` steps by a factor
    ``e^(h / CHECK_PER_INT)`` from the interval's start (``k`` within ~1e-14 relative of
    ``s sinh(y)``; the outer knots exactly)."""
    S = X.shape[0]
    out = np.empty((S, 5))
    m = CHECK_PER_INT * N_INT + 1
    ks = np.empty(m)
    gs = np.empty(m)
    C = np.empty((N_INT, 4))
    for j in range(S):
        x = X[j]
        kn = spline_knots(x)
        yl, h, s, e_l, e_r = kn[0], kn[1], kn[2], kn[5], kn[7]
        for iv in range(N_INT):  # each interval's four coefficients, once
            for c in range(4):
                C[iv, c] = _coef(x, iv - 1 + c, e_l, e_r)
        r = math.exp(h / CHECK_PER_INT)
        r_inv = 1.0 / r
        e = ei = 1.0
        wmin = math.inf
        for i in range(m):
            t = i / CHECK_PER_INT
            iv = min(i // CHECK_PER_INT, N_INT - 1)
            y = yl + h * i / CHECK_PER_INT
            if i == 0 or i == m - 1:  # on an outer knot: the side ``spline_w012`` takes
                k = s * math.sinh(y)
                w, w1, w2 = spline_w012(x, k)
            else:
                if i % CHECK_PER_INT == 0 or i == 1:  # an interval's start: e^y afresh
                    e = math.exp(y)
                    ei = 1.0 / e
                else:
                    e *= r
                    ei *= r_inv
                k = 0.5 * s * (e - ei)
                ky = 0.5 * s * (e + ei)  # dk/dy
                a1, a3 = 1.0 / (ky * h), -k / (ky * ky * ky) / h
                w, w1, w2 = _w012_coefs(C[iv], t - iv, a1, a3)
            ks[i] = k
            wmin = min(wmin, w)
            g = g_of(k, w, w1, w2) if w > 0.0 else -math.inf
            gs[i] = g if math.isfinite(g) else -math.inf
        refine(x, kn, ks, gs, REFINE_BELOW, REFINE_SUB)
        i_min = int(np.argmin(gs))
        out[j, 0] = gs[i_min]
        out[j, 1] = ks[i_min]
        out[j, 2] = wmin
        out[j, 3] = min(_wing(x, kn, False)[1], _wing(x, kn, True)[1])
        bl, br = x[I_BL], x[I_BR]
        ok = (
            out[j, 0] >= -BUTTERFLY_TOL
            and out[j, 2] > 0.0
            and out[j, 3] >= -BUTTERFLY_TOL
            and x[I_YL] < 0.0 < x[I_YR]
            and 0.0 <= bl < 2.0
            and 0.0 <= br < 2.0
        )
        out[j, 4] = 1.0 if ok else 0.0
    return out


def _check(x: FloatArray, j: int, found: FloatArray | None = None) -> list[Violation]:
    """Finite parameters, positive variance, Lee's bound, the butterfly condition
    (``found``: the row of ``check_slices`` when already computed)."""
    if not np.all(np.isfinite(x)):
        return [Violation("nonfinite", j, float("inf"), "non-finite parameters")]
    out: list[Violation] = []
    if not (x[I_YL] < 0.0 < x[I_YR] and x[I_S] > 0.0):
        return [Violation("knots", j, 1.0, "outer knots must straddle the money")]
    for name, b in (("left", x[I_BL]), ("right", x[I_BR])):
        if not 0.0 <= b < 2.0:
            out.append(Violation("lee_wing", j, abs(float(b)), f"{name} wing slope {b:.4g}"))
    if found is None:
        found = check_slices(np.ascontiguousarray(x, dtype=np.float64)[None, :])[0]
    gmin, kmin, wmin, q = (float(v) for v in found[:4])
    if not wmin > 0.0:
        out.append(Violation("negative_variance", j, -wmin, f"min w = {wmin:.3g}"))
    if not gmin >= -BUTTERFLY_TOL:
        out.append(Violation("butterfly", j, -gmin, f"g(k) = {gmin:.3g} at k = {kmin:.3f}"))
    if not q >= -BUTTERFLY_TOL:
        out.append(Violation("butterfly", j, -q, f"linear wing: 16 w^2 g / w0^2 = {q:.3g}"))
    return out


def design(x: FloatArray, k: FloatArray) -> FloatArray:
    """``w(k) = design @ x`` (rows: ``dw/dx`` at each ``k``; ``w`` is linear in ``x``)."""
    out = np.zeros((len(k), N_PARAMS))
    tmp = np.empty(N_PARAMS)
    xc = np.ascontiguousarray(x, dtype=np.float64)
    for i, ki in enumerate(np.asarray(k, dtype=np.float64).tolist()):
        spline_wgrad(xc, ki, tmp)
        out[i] = tmp
    return out


def roughness_matrix(x: FloatArray) -> FloatArray:
    """The roughness rows' matrix ``(NC, N_PARAMS)`` (rows = matrix @ x)."""
    rows = np.zeros(N_HINGE)
    ejac = np.zeros((N_HINGE, N_PARAMS))
    spline_hinges(np.ascontiguousarray(x, dtype=np.float64), -np.inf, 0.0, ROUGHNESS, rows, ejac, 0)
    return ejac[N_HINGE_BF:]


def knot_map(k: FloatArray, w: FloatArray) -> tuple[float, float, float]:
    """``(s, yl, yr)`` from a slice's quotes: the scale from the ATM total variance, the outer
    knots just beyond the quoted range and at least ``MIN_HALF_RANGE * s`` from the money."""
    order = np.argsort(k)
    ks, ws = k[order], w[order]
    w_atm = float(np.interp(0.0, ks, ws)) if len(ks) else 0.01
    s = SCALE_MULT * math.sqrt(max(w_atm, 1e-8))
    kl = min(float(ks[0]) - KNOT_MARGIN * s, -MIN_HALF_RANGE * s) if len(ks) else -2.0 * s
    kr = max(float(ks[-1]) + KNOT_MARGIN * s, MIN_HALF_RANGE * s) if len(ks) else 2.0 * s
    return s, math.asinh(max(kl, -9.9) / s), math.asinh(min(kr, 9.9) / s)


def least_squares_start(
    k: FloatArray, w: FloatArray, wt: FloatArray, roughness: float = ROUGHNESS
) -> FloatArray:
    """Weighted linear least squares for the coefficients and slopes on the mids' total
    variance (``wt``: weights of the ``w`` residuals) with the roughness rows; slopes clipped
    to Lee's box and coefficients to their floor, then the coefficients re-solved."""
    x = np.zeros(N_PARAMS)
    x[I_S], x[I_YL], x[I_YR] = knot_map(k, w)
    A = design(x, k) * wt[:, None]
    R = roughness_matrix(x) * (roughness / ROUGHNESS)
    free = np.arange(NC + 2)
    M = np.vstack([A[:, free], R[:, free]])
    rhs = np.concatenate([w * wt, np.zeros(R.shape[0])])
    ridge = 1e-10 * max(float(np.max(np.abs(M))), 1e-300)
    sol = np.linalg.lstsq(
        np.vstack([M, ridge * np.eye(len(free))]),
        np.concatenate([rhs, np.zeros(len(free))]),
        rcond=None,
    )[0]
    x[free] = sol
    x[I_BL] = min(max(x[I_BL], 0.0), MAX_SLOPE)
    x[I_BR] = min(max(x[I_BR], 0.0), MAX_SLOPE)
    cf = np.arange(NC)
    M2 = M[:, cf]
    rhs2 = rhs - M[:, [I_BL, I_BR]] @ x[[I_BL, I_BR]]
    x[cf] = np.linalg.lstsq(M2, rhs2, rcond=None)[0]
    return np.clip(x, LOWER, UPPER)


@register
class Spline(RowModel):
    """Cubic B-spline total variance per expiry, linear wings within Lee's bound;
    ``x = [c0 .. c8, bl, br, s, yl, yr]`` (the last three frozen by the cold start)."""

    name = "spline"
    n_params = N_PARAMS
    kernel_kind = KERNEL_SPLINE
    calib_defaults: ClassVar[dict[str, object]] = {
        "objective": "band",
        # pull to the mid inside the band: on the shared chains (every 12th Tardis hour, the
        # snapshot week) in band 98.1 % at 0.2, 98.8 % at 0.5, 98.3 % at 1.0
        "kappa": 0.5,
        "penalty": 1.0,
        "filters": {
            "min_T_days": 0.0833,
            "min_abs_delta": 0.0,
            "max_abs_delta": 1.0,
            "iv_floor": 0.0005,
            "min_quotes_per_slice": 5,
        },
    }

    def param_names(self, n_slices: int) -> tuple[str, ...]:
        return NAMES

    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        return LOWER.copy(), UPPER.copy()

    def iv_rows(self, rows: FloatArray, k: FloatArray, T: FloatArray) -> FloatArray:
        X = np.ascontiguousarray(rows, dtype=np.float64)
        kk = np.ascontiguousarray(k, dtype=np.float64)
        return np.asarray(spline_rows_iv(X, kk, full_shape(T, kk.shape, np.float64)))

    def block_jacobian(
        self, rows: FloatArray, k: FloatArray, T: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        X = np.ascontiguousarray(rows, dtype=np.float64)
        kk = np.ascontiguousarray(k, dtype=np.float64)
        TT = full_shape(T, kk.shape, np.float64)
        iv, jac = spline_rows_jac(X, kk, TT)
        return np.asarray(iv), np.asarray(jac)

    def total_variance(self, x: FloatArray, k: FloatArray) -> FloatArray:
        """``w(k)`` of one slice."""
        xc = np.ascontiguousarray(x, dtype=np.float64)
        return np.array([spline_w012(xc, float(v))[0] for v in np.asarray(k).tolist()])

    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        """Linear least squares on the mids' total variance (vega-like weights), with the
        roughness rows ten times stiffer (fewer wiggles to undo), then as in the fit."""
        k, iv = data.k, data.iv
        T = float(data.slice_T[0]) if data.n_slices else float(np.median(data.T))
        w = iv * iv * T
        # residual rows in half-spreads, as the fit's: d iv = d w / (2 T iv)
        wt = data.weight / np.maximum(2.0 * T * iv, 1e-12)
        return [least_squares_start(k, w, wt, 10.0 * ROUGHNESS), least_squares_start(k, w, wt)]

    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        return _check(np.asarray(x, dtype=np.float64), 0)

    def arbitrage_slices(self, X: FloatArray, slice_T: FloatArray) -> list[list[Violation]]:
        """All slices' checks in one compiled pass; details only for slices with a finding."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        if not np.all(np.isfinite(X)):
            return [_check(X[j], 0) for j in range(X.shape[0])]
        found = check_slices(X)
        return [[] if v else _check(X[j], 0, found[j]) for j, v in enumerate(found[:, 4] > 0.0)]

    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        """Penalty scales: coefficients in total variance (about 0.5 vol point at 50% vol over
        T), slopes 0.02; the frozen knot map 1 (its gradient is zero: nothing moves it)."""
        T = float(slice_T[0]) if slice_T is not None and len(slice_T) else 0.1
        return np.array([0.005 * T] * NC + [0.02, 0.02, 1.0, 1.0, 1.0])

    def slice_scales(self, slice_T: FloatArray) -> FloatArray:
        """``scale`` of every slice at once (the same values)."""
        T = np.asarray(slice_T, dtype=np.float64)
        out = np.empty((len(T), N_PARAMS))
        out[:, :NC] = 0.005 * T[:, None]
        out[:, NC:] = (0.02, 0.02, 1.0, 1.0, 1.0)
        return out
