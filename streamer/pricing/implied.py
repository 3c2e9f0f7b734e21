"""Implied Black volatility from an undiscounted price, at "Let's Be Rational" quality.

Method (after P. Jäckel, "Let's Be Rational", Wilmott 2015; the ideas, not code):

1. Normalise: ``x = ln(F/K)``, ``beta = price / sqrt(F K)``; subtract the intrinsic value and
   map to the out-of-the-money call (``x <= 0``) by put-call symmetry. No solution exists
   (NaN) when ``beta <= 0`` after that or ``beta >= b_max = e^{x/2}``.
2. Split the price axis at ``b_c = b(x, s_c)``, ``s_c = sqrt(2|x|)``: the inflection point of
   ``b(s)``, where ``h + t = 0`` so ``b_c = e^{x/2}/2 - e^{-x/2} Phi(-sqrt(2|x|))``.
3. Initial guess. The paper interpolates four rational branches; we use our own variant with
   the same role: on each side of ``b_c`` a coordinate ``u in (0, 1]`` in which ``s`` is smooth
   (``u = sqrt(ln b_c / ln beta)`` below, ``u = sqrt(ln D_c / ln D)`` above, with
   ``D = b_max - beta``, following the asymptotics ``ln b ~ -x^2/(2 s^2)`` as ``s -> 0`` and
   ``ln D ~ -s^2/8`` as ``s -> inf``), and a table of ``s`` over ``(sqrt|x|, u)`` that is
   filled at import by this very solver run to convergence, read by bilinear interpolation.
   Outside the table (``|x| > 4``) the asymptotic expansions ``b ~ P 2t/(h^2 - t^2)`` and
   ``b_max - b ~ P 2t/(t^2 - h^2)`` (``P = exp(-(h^2 + t^2)/2)/sqrt(2 pi)``, ``h = x/s``,
   ``t = s/2``) are solved by fixed point instead.
4. Householder's method of order four on the paper's transformed objectives, which are nearly
   linear in ``s``: ``1/ln b(s) - 1/ln beta`` below ``b_c`` and
   ``ln(b_max - b(s)) - ln(b_max - beta)`` above (``b_max - b`` evaluated without
   cancellation). The closed-form derivatives of ``b`` in ``s`` make each step cheap. A step
   smaller than 1e-4 relative ends the iteration: order four leaves ~1e-16 after it.

Accuracy rests on the normalised Black function of ``streamer.pricing.black``, which avoids
cancellation in every regime; tests check it against 50-digit arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamer.pricing._normal import INV_SQRT_2PI, norm_cdf
from streamer.pricing.black import otm_call_complement_e, otm_call_e

LN_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
MAX_ITERATIONS = 12
STEP_TOLERANCE = 1e-4  # order four: after a step below this the error is ~1e-16


@njit(cache=True, nogil=True)
def _householder_step(g: float, g1: float, g2: float, g3: float) -> float:
    """Order-four Householder correction for ``g(s) = 0`` given ``g, g', g'', g'''``."""
    nu = -g / g1
    h2 = g2 / g1
    h3 = g3 / g1
    return nu * (1.0 + 0.5 * h2 * nu) / (1.0 + nu * (h2 + h3 * nu / 6.0))


@njit(cache=True, nogil=True)
def _b_c(x: float) -> float:
    """``b(x, s_c)`` at the inflection point ``s_c = sqrt(2|x|)``, where ``h + t = 0``."""
    return 0.5 * math.exp(0.5 * x) - math.exp(-0.5 * x) * norm_cdf(-math.sqrt(-2.0 * x))


@njit(cache=True, nogil=True)
def _lower_guess(x: float, lb: float, s_c: float) -> float:
    """Solve ``lb = -x^2/(2 s^2) - s^2/8 + ln(s^3/(x^2 - s^4/4)) - ln sqrt(2 pi)``."""
    ax = abs(x)
    s = ax / math.sqrt(-2.0 * lb)
    for _ in range(2):
        s = min(s, 0.95 * s_c)
        s2 = s * s
        q = x * x - 0.25 * s2 * s2
        rhs = -lb + math.log(s2 * s / q) - LN_SQRT_2PI - 0.125 * s2
        if rhs <= 0.0:
            break
        s = ax / math.sqrt(2.0 * rhs)
    return min(s, s_c)


@njit(cache=True, nogil=True)
def _upper_guess(x: float, ld: float, s_c: float) -> float:
    """Solve ``ld = -x^2/(2 s^2) - s^2/8 + ln(4 s^3/(s^4 - 4 x^2)) - ln sqrt(2 pi)``."""
    s = math.sqrt(max(-8.0 * ld, 1e-300))
    for _ in range(2):
        s = max(s, 1.05 * s_c, 1e-3)
        s2 = s * s
        q = s2 * s2 - 4.0 * x * x
        rhs = -ld + math.log(4.0 * s2 * s / q) - LN_SQRT_2PI - 0.5 * x * x / s2
        if rhs <= 0.0:
            break
        s = math.sqrt(8.0 * rhs)
    return max(s, s_c)


@njit(cache=True, nogil=True)
def _asymptotic_guess(x: float, beta: float, b_c: float) -> float:
    """Initial guess from the asymptotic expansions and the tangent at ``s_c``."""
    s_c = math.sqrt(-2.0 * x)
    if beta < b_c:
        s = _lower_guess(x, math.log(beta), s_c)
        s_tan = s_c + (beta - b_c) / (INV_SQRT_2PI * math.exp(x))
        if s < s_tan < s_c:  # the tangent overshoots in the convex part: split the difference
            s = 0.5 * (s + s_tan)
        return s
    s = _upper_guess(x, math.log(math.exp(0.5 * x) - beta), s_c)
    if s_c > 0.0:
        s_tan = s_c + (beta - b_c) / (INV_SQRT_2PI * math.exp(x))
        s = max(s, s_tan)
    return s


@njit(cache=True, nogil=True)
def _householder(
    x: float, e_half: float, target: float, s: float, lower: bool, stop: float
) -> float:
    """Order-four Householder iterations from ``s`` on the branch's objective.

    ``target`` is ``ln beta`` on the lower branch and ``ln(b_max - beta)`` on the upper one
    (logs, so that prices too close to 0 or to the bound to form are still handled).
    """
    x2 = x * x
    e_neg_half = 1.0 / e_half
    inv_lb = 1.0 / target if lower else 0.0
    ln_d = target
    for _ in range(MAX_ITERATIONS):
        h = x / s
        t = 0.5 * s
        b1 = INV_SQRT_2PI * math.exp(-0.5 * (h * h + t * t))
        s2 = s * s
        r2 = x2 / (s2 * s) - 0.25 * s  # b''/b'
        r3 = r2 * r2 - 3.0 * x2 / (s2 * s2) - 0.25  # b'''/b'
        if lower:
            b = otm_call_e(x, s, e_half, e_neg_half)
            if not b > 0.0:  # underflow: s far too small
                s *= 1.5
                continue
            ilb = 1.0 / math.log(b)
            l1 = b1 / b  # (ln b)'
            l2 = l1 * (r2 - l1)  # (ln b)''
            l3 = l1 * (r3 - 3.0 * l1 * r2 + 2.0 * l1 * l1)  # (ln b)'''
            g = ilb - inv_lb  # 1/ln b - 1/ln beta and its derivatives
            g1 = -l1 * ilb * ilb
            g2 = (2.0 * l1 * l1 * ilb - l2) * ilb * ilb
            g3 = (-6.0 * l1 * l1 * l1 * ilb * ilb + 6.0 * l1 * l2 * ilb - l3) * ilb * ilb
        else:
            d = otm_call_complement_e(x, s, e_half, e_neg_half)
            if not d > 0.0:  # underflow: s far too large
                s *= 0.5
                continue
            g1 = -b1 / d  # ln(b_max - b) - ln(b_max - beta), (b_max - b)' = -b'
            g = math.log(d) - ln_d
            g2 = g1 * (r2 - g1)
            g3 = g1 * (r3 - 3.0 * g1 * r2 + 2.0 * g1 * g1)
        ds = _householder_step(g, g1, g2, g3)
        if not math.isfinite(ds):
            break
        s_new = s + ds
        if s_new <= 0.0:
            s_new = 0.5 * s
        converged = abs(s_new - s) <= stop * s
        s = s_new
        if converged:
            break
    return s


# Guess tables over (sqrt|x|, u): lower r_l = s / s_c, upper r_u = s u / S_u with
# S_u = sqrt(-8 ln D_c); both are smooth and bounded on [0, 2] x (0, 1].
TABLE_XI_MAX = 2.0  # sqrt|x| up to 2, i.e. |x| <= 4
TABLE_XI_MIN = 1e-3
TABLE_NXI = 129
TABLE_NU = 129
UNDERFLOW_LOG = -700.0


@njit(cache=True, nogil=True)
def _fill_tables(nxi: int, nu: int, xi_max: float) -> tuple[np.ndarray, np.ndarray]:
    lower = np.empty((nxi, nu))
    upper = np.empty((nxi, nu))
    for i in range(nxi):
        xi = max(xi_max * i / (nxi - 1), TABLE_XI_MIN)
        x = -xi * xi
        s_c = math.sqrt(-2.0 * x)
        b_c = _b_c(x)
        d_c = math.exp(0.5 * x) - b_c
        s_u = math.sqrt(-8.0 * math.log(d_c))
        for j in range(nu):
            u = min(max(j / (nu - 1), 1e-3), 1.0 - 1e-9)
            lb = math.log(b_c) / (u * u)  # ln beta at this u
            if lb < UNDERFLOW_LOG:  # beta underflows: the asymptotic solution is exact enough
                lower[i, j] = _lower_guess(x, lb, s_c) / s_c
            else:
                s0 = _asymptotic_guess(x, math.exp(lb), b_c)
                lower[i, j] = _householder(x, math.exp(0.5 * x), lb, s0, True, 1e-15) / s_c
            ld = math.log(d_c) / (u * u)  # ln(b_max - beta) at this u
            if ld < UNDERFLOW_LOG:
                upper[i, j] = _upper_guess(x, ld, s_c) * u / s_u
            else:
                s0 = max(_upper_guess(x, ld, s_c), 1e-3)
                upper[i, j] = _householder(x, math.exp(0.5 * x), ld, s0, False, 1e-15) * u / s_u
    return lower, upper


LOWER_TABLE, UPPER_TABLE = _fill_tables(TABLE_NXI, TABLE_NU, TABLE_XI_MAX)


@njit(cache=True, nogil=True)
def _bilinear(table: np.ndarray, xi: float, u: float) -> float:
    fi = xi / TABLE_XI_MAX * (TABLE_NXI - 1)
    fj = u * (TABLE_NU - 1)
    i = min(int(fi), TABLE_NXI - 2)
    j = min(int(fj), TABLE_NU - 2)
    wi = fi - i
    wj = fj - j
    low = (1.0 - wj) * table[i, j] + wj * table[i, j + 1]
    high = (1.0 - wj) * table[i + 1, j] + wj * table[i + 1, j + 1]
    return float((1.0 - wi) * low + wi * high)


@njit(cache=True, nogil=True)
def normalised_implied_s(
    beta: float, x: float, e_half: float, lower_t: np.ndarray, upper_t: np.ndarray
) -> float:
    """Total implied volatility ``s = sigma sqrt(T)`` of an out-of-the-money call.

    ``x <= 0``, ``e_half = e^{x/2}`` and ``0 < beta < e_half`` are the caller's responsibility.
    """
    b_c = 0.5 * e_half - norm_cdf(-math.sqrt(-2.0 * x)) / e_half
    lower = beta < b_c
    xi = math.sqrt(-x)
    if lower:
        target = math.log(beta)
        if TABLE_XI_MIN <= xi < TABLE_XI_MAX:
            u = math.sqrt(math.log(b_c) / target)
            s = _bilinear(lower_t, xi, u) * math.sqrt(-2.0 * x)
        else:
            s = _asymptotic_guess(x, beta, b_c)
    else:
        target = math.log(e_half - beta)
        if TABLE_XI_MIN <= xi < TABLE_XI_MAX:
            ln_d_c = math.log(e_half - b_c)
            u = math.sqrt(ln_d_c / target)
            s = _bilinear(upper_t, xi, u) * math.sqrt(-8.0 * ln_d_c) / u
        else:
            s = _asymptotic_guess(x, beta, b_c)
    return _householder(x, e_half, target, s, lower, STEP_TOLERANCE)


@njit(cache=True, nogil=True)
def implied_vol_scalar(
    price: float,
    F: float,
    K: float,
    T: float,
    is_call: bool,
    lower_t: np.ndarray,
    upper_t: np.ndarray,
) -> float:
    """Black-76 implied vol of an undiscounted USD price; NaN where no vol exists."""
    if not (F > 0.0 and K > 0.0 and T > 0.0 and price >= 0.0):
        return math.nan
    if math.isinf(F) or math.isinf(K) or math.isinf(T) or math.isinf(price):
        return math.nan
    intrinsic = max(F - K, 0.0) if is_call else max(K - F, 0.0)
    otm_value = price - intrinsic
    upper = F - intrinsic if is_call else K - intrinsic  # = min(F, K)
    if not otm_value > 0.0 or otm_value >= upper:
        return math.nan
    x = -abs(math.log(F / K))
    beta = otm_value / math.sqrt(F * K)
    e_half = math.exp(0.5 * x)
    if not beta > 0.0 or beta >= e_half:
        return math.nan
    return normalised_implied_s(beta, x, e_half, lower_t, upper_t) / math.sqrt(T)


@njit(cache=True, nogil=True)
def _implied_vol_loop(
    price: np.ndarray,
    F: np.ndarray,
    K: np.ndarray,
    T: np.ndarray,
    is_call: np.ndarray,
    lower_t: np.ndarray,
    upper_t: np.ndarray,
) -> np.ndarray:
    out = np.empty(price.shape[0])
    for i in range(price.shape[0]):
        out[i] = implied_vol_scalar(price[i], F[i], K[i], T[i], is_call[i], lower_t, upper_t)
    return out


def implied_vol_kernel(
    price: np.ndarray, F: np.ndarray, K: np.ndarray, T: np.ndarray, is_call: np.ndarray
) -> np.ndarray:
    """Implied vols of 1-d arrays (the tables are passed in; numba kernels take no globals)."""
    out: np.ndarray = _implied_vol_loop(price, F, K, T, is_call, LOWER_TABLE, UPPER_TABLE)
    return out
