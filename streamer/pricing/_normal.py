"""Standard normal density and distribution as numba kernels (scalar, no logging)."""

from __future__ import annotations

import math

from numba import njit

SQRT2 = math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(cache=True, nogil=True, fastmath=False)
def norm_pdf(z: float) -> float:
    """phi(z) = exp(-z^2/2) / sqrt(2 pi)."""
    return INV_SQRT_2PI * math.exp(-0.5 * z * z)


@njit(cache=True, nogil=True, fastmath=False)
def norm_cdf(z: float) -> float:
    """Phi(z) through erfc, relative accuracy near the ulp in both tails."""
    return 0.5 * math.erfc(-z / SQRT2)


ERFCX_CF_FROM = 26.0  # erfc(26) ~ 6e-296: below this exp * erfc is exact enough
ERFCX_CF_TERMS = 12
SQRT_PI = math.sqrt(math.pi)


@njit(cache=True, nogil=True)
def erfcx(u: float) -> float:
    """Scaled complementary error function ``exp(u^2) erfc(u)`` for ``u >= 0``.

    Below 26: ``exp(u^2)`` is formed as ``exp(v^2) exp((u - v)(u + v))`` with ``v`` = ``u``
    rounded to 1/16, so the square's rounding is not amplified (Jäckel 2015, section 5), times
    libm's ``erfc``, accurate to an ulp or two before it underflows.
    From 26 on: Laplace's continued fraction (12 levels suffice there)
    ``erfcx(u) = 1/sqrt(pi) / (u + (1/2)/(u + 1/(u + (3/2)/(u + ...))))``,
    evaluated bottom-up.
    """
    if u < ERFCX_CF_FROM:
        v = math.floor(u * 16.0) / 16.0
        return math.exp(v * v) * math.exp((u - v) * (u + v)) * math.erfc(u)
    f = u
    for k in range(ERFCX_CF_TERMS, 0, -1):
        f = u + 0.5 * k / f
    return 1.0 / (SQRT_PI * f)


@njit(cache=True, nogil=True)
def mills_neg(z: float) -> float:
    """``Phi(z) / phi(z)`` for ``z <= 0`` (finite, about ``1/|z|`` far out)."""
    return math.sqrt(0.5 * math.pi) * erfcx(-z / SQRT2)
