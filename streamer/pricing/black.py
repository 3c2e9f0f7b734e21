"""Black-76 (undiscounted, r = 0) price in USD per unit of underlying, as numba kernels.

The price is computed through the *normalised* Black function of Jäckel (2015),
``b(x, s) = B / sqrt(F K)`` with ``x = ln(F/K)`` and ``s = sigma sqrt(T)``:

    b(x, s, theta) = theta [ e^{x/2} Phi(theta (x/s + s/2)) - e^{-x/2} Phi(theta (x/s - s/2)) ].

Every option is reduced to its out-of-the-money call ``x <= 0`` (put-call symmetry
``b(x, s, -1) = b(-x, s, 1)`` and parity ``b(x, s, 1) - b(x, s, -1) = e^{x/2} - e^{-x/2}``),
so the only value ever subtracted is the out-of-the-money part. That part is evaluated

* by the plain two-term formula where the terms are not close (its relative error is about
  ``eps / t`` near the money and ``eps |h| / t`` in implied-vol terms far out, so it is used
  for ``t >= 0.02`` and ``|h| <= 50 t``),
* as ``phi(h) e^{-t^2/2} [Y(h+t) - Y(h-t)]`` with the Mills ratio ``Y = Phi/phi`` taken from
  the scaled complementary error function when both arguments are in the left tail (this
  keeps the rounding of ``h +- t`` from being amplified by ``(h +- t)^2``), and
* by a Taylor series in ``t = s/2`` where they are (small ``t`` near the money): with
  ``h = x/s`` and ``q(u) = e^{h u} Phi(h + u)``, ``b = q(t) - q(-t)`` and
  ``q' = h q + phi(h) e^{-u^2/2}``, so ``q = phi(h) sum c_n u^n`` with
  ``c_0 = Phi(h)/phi(h)`` and ``(n+1) c_{n+1} = h c_n + e_n`` (``e_n`` the coefficients of
  ``e^{-u^2/2}``); only odd terms survive: ``b = 2 phi(h) sum_{n odd} c_n t^n``.

Its complement to the upper bound, ``e^{x/2} - b = e^{x/2} Phi(-h-t) + e^{-x/2} Phi(h-t)``, is a
sum of positive terms and is evaluated directly (used by the implied-vol upper branch).

Derivatives in ``s`` are closed form (Jäckel 2015, section 3):
``b' = exp(-(h^2 + t^2)/2) / sqrt(2 pi)``, ``b''/b' = x^2/s^3 - s/4``,
``b'''/b' = (b''/b')^2 - 3 x^2/s^4 - 1/4``.

Reference: P. Jäckel, "Let's Be Rational", Wilmott (2015) 40-53.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamer.pricing._normal import INV_SQRT_2PI, mills_neg, norm_cdf, norm_pdf

SERIES_T_MAX = 0.02  # Taylor series in t below this t = s/2 (the terms cancel to ~t) ...
SERIES_H_MAX = 4.0  # ... and |h| = |x|/s below this
SERIES_TERMS = 25
TAIL_H_OVER_T = 50.0  # Mills-ratio form where both arguments are in the tail and |h| > 50 t


@njit(cache=True, nogil=True)
def otm_call(x: float, s: float) -> float:
    """Normalised out-of-the-money call ``b(x, s)`` for ``x <= 0``, ``s > 0``."""
    e = math.exp(0.5 * x)
    return otm_call_e(x, s, e, 1.0 / e)


@njit(cache=True, nogil=True)
def otm_call_e(x: float, s: float, e_half: float, e_neg_half: float) -> float:
    """``otm_call`` given ``e^{x/2}`` and ``e^{-x/2}`` (hoisted out of solver loops)."""
    h = x / s
    t = 0.5 * s
    if t < SERIES_T_MAX and abs(h) < SERIES_H_MAX:
        return 2.0 * norm_pdf(h) * _odd_series(h, t)
    if h + t < -1.0 and -h > TAIL_H_OVER_T * t:
        # both tails: b = phi(h) e^{-t^2/2} [Y(h+t) - Y(h-t)], Y = Phi/phi via erfcx
        pref = INV_SQRT_2PI * math.exp(-0.5 * (h * h + t * t))
        return pref * (mills_neg(h + t) - mills_neg(h - t))
    return e_half * norm_cdf(h + t) - e_neg_half * norm_cdf(h - t)


@njit(cache=True, nogil=True)
def _odd_series(h: float, t: float) -> float:
    """``sum_{n odd} c_n t^n`` with ``c_0 = Phi(h)/phi(h)``, ``(n+1) c_{n+1} = h c_n + e_n``."""
    c = norm_cdf(h) / norm_pdf(h)
    e_even = 1.0  # e_0; e_{2m} = (-1/2)^m / m!, odd e_n are 0
    total = 0.0
    tn = 1.0
    for n in range(SERIES_TERMS):
        e_n = e_even if n % 2 == 0 else 0.0
        c = (h * c + e_n) / (n + 1)  # now c_{n+1}
        tn *= t
        if n % 2 == 0:  # n + 1 odd: keep the term
            term = c * tn
            total += term
            if abs(term) <= 1e-17 * abs(total):
                break
        else:  # n + 1 even: next even coefficient of exp(-u^2/2)
            e_even *= -0.5 / ((n + 1) // 2)
    return total


@njit(cache=True, nogil=True)
def otm_call_complement(x: float, s: float) -> float:
    """``e^{x/2} - b(x, s)`` for ``x <= 0``: a sum of two positive terms, no cancellation."""
    e = math.exp(0.5 * x)
    return otm_call_complement_e(x, s, e, 1.0 / e)


@njit(cache=True, nogil=True)
def otm_call_complement_e(x: float, s: float, e_half: float, e_neg_half: float) -> float:
    """``otm_call_complement`` given ``e^{x/2}`` and ``e^{-x/2}``."""
    h = x / s
    t = 0.5 * s
    return e_half * norm_cdf(-h - t) + e_neg_half * norm_cdf(h - t)


@njit(cache=True, nogil=True)
def vega_s(x: float, s: float) -> float:
    """``db/ds`` of the normalised Black function (same for calls and puts)."""
    h = x / s
    t = 0.5 * s
    return INV_SQRT_2PI * math.exp(-0.5 * (h * h + t * t))


@njit(cache=True, nogil=True)
def black_scalar(F: float, K: float, T: float, sigma: float, is_call: bool) -> float:
    """Undiscounted Black-76 price in USD per unit of underlying."""
    if not (F > 0.0 and K > 0.0) or math.isnan(T) or math.isnan(sigma):
        return math.nan
    intrinsic = max(F - K, 0.0) if is_call else max(K - F, 0.0)
    if T <= 0.0 or sigma <= 0.0:
        return intrinsic
    s = sigma * math.sqrt(T)
    if math.isinf(s):
        return F if is_call else K
    x = math.log(F / K)
    return intrinsic + math.sqrt(F * K) * otm_call(-abs(x), s)


@njit(cache=True, nogil=True)
def black_kernel(
    F: np.ndarray, K: np.ndarray, T: np.ndarray, sigma: np.ndarray, is_call: np.ndarray
) -> np.ndarray:
    out = np.empty(F.shape[0])
    for i in range(F.shape[0]):
        out[i] = black_scalar(F[i], K[i], T[i], sigma[i], is_call[i])
    return out
