"""Black-76 Greeks (undiscounted, r = 0) and Deribit's units for coin-margined options.

All Greeks are of the USD price ``V(F, K, T, sigma)`` per unit of underlying:

=========  ==========================  =====================================================
name       definition                  unit
=========  ==========================  =====================================================
delta      dV/dF                       per unit of underlying (call N(d1), put N(d1) - 1)
gamma      d2V/dF2                     per USD of forward
vega       dV/dsigma                   USD per 1.00 of vol (divide by 100 for a vol point)
theta      dV/dt = -dV/dT              USD per year of calendar time (negative: decay)
vanna      d2V/dF dsigma               per unit of underlying per 1.00 of vol
volga      d2V/dsigma2                 USD per (1.00 of vol)^2
=========  ==========================  =====================================================

with ``d1 = (ln(F/K) + sigma^2 T/2)/(sigma sqrt T)``, ``d2 = d1 - sigma sqrt T``:
``gamma = phi(d1)/(F sigma sqrt T)``, ``vega = F phi(d1) sqrt T``,
``theta = -F phi(d1) sigma / (2 sqrt T)``, ``vanna = -phi(d1) d2 / sigma``,
``volga = vega d1 d2 / sigma`` (e.g. Haug, "The Complete Guide to Option Pricing Formulas").

Deribit's units (DESIGN section 2): vega per vol point (``vega / 100``), theta per day
``theta / 365``; Deribit shows the smaller of the one-day and the lifetime decay: within the
last day the daily rate times the days left, and never more than the whole premium. We
inferred this rule from Deribit's own Greeks in ../shared/data (bottama chains), where it
reproduces their theta; the instantaneous per-day theta is the plain ``theta / 365``), coin price
``V / F`` and premium-adjusted delta ``delta - V / F``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamer.pricing._normal import norm_cdf, norm_pdf
from streamer.pricing.black import black_scalar

N_GREEKS = 6
DAYS_PER_YEAR = 365.0


@njit(cache=True, nogil=True)
def greeks_scalar(
    F: float, K: float, T: float, sigma: float, is_call: bool, out: np.ndarray
) -> None:
    """Write delta, gamma, vega, theta, vanna, volga into ``out[0:6]``."""
    if not (F > 0.0 and K > 0.0) or math.isnan(T) or math.isnan(sigma):
        out[:] = math.nan
        return
    if T <= 0.0 or sigma <= 0.0:
        itm = F > K if is_call else F < K
        out[:] = 0.0
        if itm:
            out[0] = 1.0 if is_call else -1.0
        return
    sqrt_t = math.sqrt(T)
    sd = sigma * sqrt_t
    d1 = math.log(F / K) / sd + 0.5 * sd
    d2 = d1 - sd
    pdf = norm_pdf(d1)
    out[0] = norm_cdf(d1) if is_call else -norm_cdf(-d1)
    out[1] = pdf / (F * sd)
    vega = F * pdf * sqrt_t
    out[2] = vega
    out[3] = -F * pdf * sigma / (2.0 * sqrt_t)
    out[4] = -pdf * d2 / sigma
    out[5] = vega * d1 * d2 / sigma


@njit(cache=True, nogil=True)
def greeks_kernel(
    F: np.ndarray, K: np.ndarray, T: np.ndarray, sigma: np.ndarray, is_call: np.ndarray
) -> np.ndarray:
    out = np.empty((N_GREEKS, F.shape[0]))
    row = np.empty(N_GREEKS)
    for i in range(F.shape[0]):
        greeks_scalar(F[i], K[i], T[i], sigma[i], is_call[i], row)
        out[:, i] = row
    return out


@njit(cache=True, nogil=True)
def deribit_theta_scalar(F: float, K: float, T: float, sigma: float, is_call: bool) -> float:
    """Deribit theta: USD per day, over at most the days left, capped at the premium."""
    if not (F > 0.0 and K > 0.0 and T > 0.0 and sigma > 0.0):
        return math.nan if math.isnan(F + K + T + sigma) else 0.0
    sd = sigma * math.sqrt(T)
    d1 = math.log(F / K) / sd + 0.5 * sd
    theta_day = -F * norm_pdf(d1) * sigma / (2.0 * math.sqrt(T)) / DAYS_PER_YEAR
    days = T * DAYS_PER_YEAR
    if days < 1.0:  # lifetime decay at today's rate, not a full day's
        theta_day *= days
    return max(theta_day, -black_scalar(F, K, T, sigma, is_call))


@njit(cache=True, nogil=True)
def deribit_theta_kernel(
    F: np.ndarray, K: np.ndarray, T: np.ndarray, sigma: np.ndarray, is_call: np.ndarray
) -> np.ndarray:
    out = np.empty(F.shape[0])
    for i in range(F.shape[0]):
        out[i] = deribit_theta_scalar(F[i], K[i], T[i], sigma[i], is_call[i])
    return out
