"""Implied Black volatility from an undiscounted price, at "Let's Be Rational" quality.

Method (P. Jäckel, "Let's Be Rational", Wilmott 2015; ideas, not code, are taken from it):

1. Normalise: ``x = ln(F/K)``, ``beta = price / sqrt(F K)``; subtract the intrinsic value and
   map to the out-of-the-money call (``x <= 0``) by put-call symmetry. No solution exists
   (NaN) when ``beta <= 0`` after that or ``beta >= b_max = e^{x/2}``.
2. Split the price axis at ``b_c = b(x, s_c)``, ``s_c = sqrt(2|x|)``: the inflection point of
   ``b(s)`` (``b'' = 0``), where the function changes from convex to concave.
3. Initial guess from the asymptotics of each side (our derivation, in the spirit of the
   paper's rational branches): with ``P = exp(-(h^2 + t^2)/2)/sqrt(2 pi)``, ``h = x/s``,
   ``t = s/2``, the Mills-ratio expansion gives ``b ~ P 2t/(h^2 - t^2)`` as ``s -> 0`` and
   ``b_max - b ~ P 2t/(t^2 - h^2)`` as ``s -> inf``; two fixed-point steps solve them for
   ``s``. The tangent at ``s_c`` is used instead where it is the better guess.
4. Householder's method of order four on a transformed objective that is nearly linear in
   ``s`` (the paper's choice): ``1/ln b(s) - 1/ln beta`` below ``b_c`` and
   ``ln(b_max - b(s)) - ln(b_max - beta)`` above, with ``b_max - b`` evaluated without
   cancellation. The closed-form derivatives of ``b`` in ``s`` make each step cheap.
   Iteration stops once the step is below 1e-7 relative (the next would be below 1e-28).

Accuracy rests on the normalised Black function of ``streamer.pricing.black``, which avoids
cancellation in every regime.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamer.pricing._normal import INV_SQRT_2PI
from streamer.pricing.black import otm_call, otm_call_complement

LN_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
MAX_ITERATIONS = 12
STEP_TOLERANCE = 1e-7


@njit(cache=True, nogil=True)
def _householder_step(g: float, g1: float, g2: float, g3: float) -> float:
    """Order-four Householder correction for ``g(s) = 0`` given ``g, g', g'', g'''``."""
    nu = -g / g1
    h2 = g2 / g1
    h3 = g3 / g1
    return nu * (1.0 + 0.5 * h2 * nu) / (1.0 + nu * (h2 + h3 * nu / 6.0))


@njit(cache=True, nogil=True)
def _lower_guess(x: float, beta: float, s_c: float) -> float:
    """Solve ``ln beta = -x^2/(2 s^2) - s^2/8 + ln(s^3/(x^2 - s^4/4)) - ln sqrt(2 pi)``."""
    lb = math.log(beta)
    ax = abs(x)
    s = ax / math.sqrt(-2.0 * lb)
    for _ in range(2):
        s = min(s, 0.95 * s_c)
        q = x * x - 0.25 * s**4
        rhs = -lb + math.log(s**3 / q) - LN_SQRT_2PI - 0.125 * s * s
        if rhs <= 0.0:
            break
        s = ax / math.sqrt(2.0 * rhs)
    return min(s, s_c)


@njit(cache=True, nogil=True)
def _upper_guess(x: float, d: float, s_c: float) -> float:
    """Solve ``ln d = -x^2/(2 s^2) - s^2/8 + ln(4 s^3/(s^4 - 4 x^2)) - ln sqrt(2 pi)``."""
    ld = math.log(d)
    s = math.sqrt(max(-8.0 * ld, 1e-300))
    for _ in range(2):
        s = max(s, 1.05 * s_c, 1e-3)
        q = s**4 - 4.0 * x * x
        rhs = -ld + math.log(4.0 * s**3 / q) - LN_SQRT_2PI - 0.5 * x * x / (s * s)
        if rhs <= 0.0:
            break
        s = math.sqrt(8.0 * rhs)
    return max(s, s_c)


@njit(cache=True, nogil=True)
def normalised_implied_s(beta: float, x: float) -> float:
    """Total implied volatility ``s = sigma sqrt(T)`` of an out-of-the-money call.

    ``x <= 0`` and ``0 < beta < e^{x/2}`` are the caller's responsibility.
    """
    b_max = math.exp(0.5 * x)
    s_c = math.sqrt(-2.0 * x)
    lower = False
    if s_c > 0.0:
        b_c = otm_call(x, s_c)
        v_c = INV_SQRT_2PI * math.exp(x)  # b'(s_c): h^2 + t^2 = |x|/2 + |x|/2 ... = -x
        lower = beta < b_c
        s_tan = s_c + (beta - b_c) / v_c
    if lower:
        s = _lower_guess(x, beta, s_c)
        if s_tan > s:  # the tangent overshoots in the convex part: take the larger if valid
            s = 0.5 * (s + s_tan) if s_tan < s_c else s
    else:
        d_target = b_max - beta
        s = _upper_guess(x, d_target, s_c)
        if s_c > 0.0 and s_tan > s_c and s_tan > s:
            s = s_tan
    if lower:
        inv_lb = 1.0 / math.log(beta)
    else:
        ln_d = math.log(b_max - beta)
    for _ in range(MAX_ITERATIONS):
        h = x / s
        t = 0.5 * s
        b1 = INV_SQRT_2PI * math.exp(-0.5 * (h * h + t * t))
        r2 = x * x / (s * s * s) - 0.25 * s  # b''/b'
        r3 = r2 * r2 - 3.0 * x * x / (s**4) - 0.25  # b'''/b'
        if lower:
            b = otm_call(x, s)
            if not b > 0.0:
                s *= 1.5
                continue
            lb = math.log(b)
            l1 = b1 / b
            l2 = l1 * r2 - l1 * l1
            l3 = l1 * r3 - 3.0 * l1 * l1 * r2 + 2.0 * l1**3
            g = 1.0 / lb - inv_lb
            g1 = -l1 / (lb * lb)
            g2 = 2.0 * l1 * l1 / lb**3 - l2 / (lb * lb)
            g3 = -6.0 * l1**3 / lb**4 + 6.0 * l1 * l2 / lb**3 - l3 / (lb * lb)
        else:
            d = otm_call_complement(x, s)
            if not d > 0.0:
                s *= 0.5
                continue
            q1 = -b1 / d
            q2 = q1 * r2 - q1 * q1
            q3 = q1 * r3 - 3.0 * q1 * q1 * r2 + 2.0 * q1**3
            g = math.log(d) - ln_d
            g1, g2, g3 = q1, q2, q3
        ds = _householder_step(g, g1, g2, g3)
        if not math.isfinite(ds):
            break
        s_new = s + ds
        if s_new <= 0.0:
            s_new = 0.5 * s
        converged = abs(s_new - s) <= STEP_TOLERANCE * s
        s = s_new
        if converged:
            break
    return s


@njit(cache=True, nogil=True)
def implied_vol_scalar(price: float, F: float, K: float, T: float, is_call: bool) -> float:
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
    sqrt_fk = math.sqrt(F * K)
    x = -abs(math.log(F / K))
    beta = otm_value / sqrt_fk
    if not beta > 0.0 or beta >= math.exp(0.5 * x):
        return math.nan
    return normalised_implied_s(beta, x) / math.sqrt(T)


@njit(cache=True, nogil=True)
def implied_vol_kernel(
    price: np.ndarray, F: np.ndarray, K: np.ndarray, T: np.ndarray, is_call: np.ndarray
) -> np.ndarray:
    out = np.empty(price.shape[0])
    for i in range(price.shape[0]):
        out[i] = implied_vol_scalar(price[i], F[i], K[i], T[i], is_call[i])
    return out
