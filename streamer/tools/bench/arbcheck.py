"""An independent static-arbitrage check of published IVs (not the models' own ``arbitrage``).

Works on what a bot receives: per expiry the listed strikes, their published IVs, the forward
and the time to expiry. With undiscounted Black call prices per unit of forward,
``c(x) = C(F, K, T, iv(K)) / F`` at ``x = K / F``, a smile is free of butterfly arbitrage on its
strikes when (Carr & Madan 2005, "A note on sufficient conditions for no arbitrage"):

* ``monotone``: call prices do not rise with the strike, ``c(x_{i+1}) <= c(x_i)``, and fall no
  faster than the forward, slope ``>= -1``;
* ``convexity``: every butterfly on three neighbouring strikes costs at least nothing,
  ``c(x_i) <= (x_{i+1} - x_i)/(x_{i+1} - x_{i-1}) c(x_{i-1}) + (x_i - x_{i-1})/(x_{i+1} -
  x_{i-1}) c(x_{i+1})``.

Between neighbouring expiries ``T_a < T_b``, ``calendar``: total variance ``w = iv^2 T`` must
not fall at fixed log-moneyness ``k = ln(K/F)`` (Gatheral 2004; exact for the undiscounted,
proportional-dividend case), i.e. ``c_b(x) >= c_a(x)`` at every ``x = K/F``, checked on the two
expiries' common range at each one's listed strikes. The other expiry is known only at its own
strikes, so a finding is a *certain* arbitrage of the listed prices: the long expiry's call at
one of its strikes lies below the lowest call price any convex, monotone interpolation of the
short expiry's listed calls allows there (the tangent extensions of its neighbouring chords,
``c(x_{i+1})``, ``c(x_i) - (x - x_i)`` and the intrinsic value), or the short expiry's call at
one of its strikes lies above the highest the long expiry's allows (its chord). Interpolating
the other expiry's ``w`` linearly in ``k`` instead (this module's first version) flags convex
wings between sparse strikes that no arbitrage-free reading of the quotes carries: the chord
of a convex ``w`` lies above it. The tolerance is the one in total variance, ``W_TOL_ABS +
W_TOL_REL * w``, turned into price by the call's sensitivity ``dc/dw = x phi(d2) / (2 sqrt(w))``.

Each violation beyond the tolerances is one ``Finding``. Strikes with no finite IV are
skipped (a missing IV is the quality measure's business); calls and puts of one strike share
an IV (their mean if they differ).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import ndtr

FloatArray = npt.NDArray[np.float64]
PRICE_TOL = 1e-9  # per unit of forward (1e-4 USD at a 100k forward)
SLOPE_TOL = 1e-9
W_TOL_ABS = 1e-6  # total variance
W_TOL_REL = 1e-3  # of the larger total variance compared


@dataclass(frozen=True)
class Smile:
    """One expiry as published: strikes (any order, repeats allowed) and their IVs."""

    expiry: str
    T: float
    forward: float
    strike: FloatArray
    iv: FloatArray

    def clean(self) -> tuple[FloatArray, FloatArray]:
        """Sorted unique strikes with a finite, positive IV, and the IV of each (mean)."""
        ok = np.isfinite(self.iv) & (self.iv > 0) & np.isfinite(self.strike) & (self.strike > 0)
        K, iv = np.asarray(self.strike)[ok], np.asarray(self.iv)[ok]
        u, inv = np.unique(K, return_inverse=True)
        s = np.zeros(len(u))
        c = np.zeros(len(u))
        np.add.at(s, inv, iv)
        np.add.at(c, inv, 1.0)
        return u, s / np.maximum(c, 1.0)


@dataclass(frozen=True)
class Finding:
    check: str  # "monotone" | "convexity" | "calendar"
    expiry: str  # the (longer) expiry it concerns
    strike: float
    amount: float  # price per unit of forward


def black_call(x: FloatArray, T: float, iv: FloatArray) -> FloatArray:
    """Undiscounted Black call per unit of forward at ``x = K/F`` (scipy's normal CDF, not
    the package's pricer: the check stays independent of the code it checks)."""
    sd = iv * math.sqrt(T)
    d1 = -np.log(x) / sd + 0.5 * sd
    return np.asarray(ndtr(d1) - x * ndtr(d1 - sd), dtype=np.float64)


def butterfly(smile: Smile) -> list[Finding]:
    """Monotone and convex call prices in strike, on the smile's strikes."""
    K, iv = smile.clean()
    out: list[Finding] = []
    if len(K) < 2 or not (smile.T > 0 and smile.forward > 0):
        return out
    x = K / smile.forward
    c = black_call(x, smile.T, iv)
    dc = np.diff(c)
    slope = dc / np.diff(x)
    for i in np.flatnonzero(dc > PRICE_TOL):
        out.append(Finding("monotone", smile.expiry, float(K[i + 1]), float(dc[i])))
    for i in np.flatnonzero(slope < -1.0 - SLOPE_TOL):
        out.append(Finding("monotone", smile.expiry, float(K[i + 1]), float(-1.0 - slope[i])))
    if len(K) >= 3:
        lo, mid, hi = x[:-2], x[1:-1], x[2:]
        wl = (hi - mid) / (hi - lo)
        chord = wl * c[:-2] + (1.0 - wl) * c[2:]
        excess = c[1:-1] - chord
        for i in np.flatnonzero(excess > PRICE_TOL):
            out.append(Finding("convexity", smile.expiry, float(K[i + 1]), float(excess[i])))
    return out


def _lowest(x: FloatArray, c: FloatArray, at: FloatArray) -> FloatArray:
    """The lowest call price at ``at`` (inside ``[x[0], x[-1]]``) of any convex call curve
    with slope in ``[-1, 0]`` through the points ``(x, c)``."""
    n = len(x)
    i = np.clip(np.searchsorted(x, at, side="right") - 1, 0, n - 2)
    lo = np.maximum(np.maximum(1.0 - at, 0.0), c[i + 1])  # intrinsic; decreasing in x
    lo = np.maximum(lo, c[i] - (at - x[i]))  # slope >= -1
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.diff(c) / np.diff(x)
    left = i >= 1  # tangent extension of the chord to the left of the bracket
    ext = c[i] + slope[np.maximum(i - 1, 0)] * (at - x[i])
    lo = np.where(left, np.maximum(lo, ext), lo)
    right = i + 2 <= n - 1  # ... and of the one to its right
    ext = c[i + 1] + slope[np.minimum(i + 1, n - 2)] * (at - x[i + 1])
    lo = np.where(right, np.maximum(lo, ext), lo)
    exact = np.isclose(at, x[i], rtol=0.0, atol=1e-15)
    return np.asarray(np.where(exact, c[i], lo), dtype=np.float64)


def _dc_dw(x: FloatArray, w: FloatArray) -> FloatArray:
    """Sensitivity of the undiscounted Black call per unit of forward to total variance."""
    sd = np.sqrt(w)
    d2 = -np.log(x) / sd - 0.5 * sd
    return np.asarray(x * np.exp(-0.5 * d2 * d2) / (2.0 * math.sqrt(2.0 * math.pi) * sd))


def calendar(short: Smile, long: Smile) -> list[Finding]:
    """Listed calls of ``long`` below what ``short``'s listed calls force, or the reverse
    (module docstring), on the two expiries' common range of ``x = K/F``."""
    out: list[Finding] = []
    Ka, iva = short.clean()
    Kb, ivb = long.clean()
    if len(Ka) < 2 or len(Kb) < 2 or not (short.forward > 0 and long.forward > 0):
        return out
    xa, xb = Ka / short.forward, Kb / long.forward
    ca, cb = black_call(xa, short.T, iva), black_call(xb, long.T, ivb)
    wa, wb = iva * iva * short.T, ivb * ivb * long.T
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    if not lo < hi:
        return out
    seen: set[float] = set()

    def tol(x: FloatArray, w: FloatArray) -> FloatArray:
        return np.asarray(PRICE_TOL + _dc_dw(x, w) * (W_TOL_ABS + W_TOL_REL * w))

    # the long expiry's strikes: its call against the lowest the short's quotes allow
    m = (xb >= lo) & (xb <= hi)
    gap = _lowest(xa, ca, xb[m]) - cb[m]
    for i in np.flatnonzero(gap > tol(xb[m], wb[m])):
        strike = float(Kb[m][i])
        seen.add(strike)
        out.append(Finding("calendar", long.expiry, strike, float(gap[i])))
    # the short expiry's strikes: its call against the highest the long's quotes allow (chord)
    m = (xa >= lo) & (xa <= hi)
    gap = ca[m] - np.interp(xa[m], xb, cb)
    for i in np.flatnonzero(gap > tol(xa[m], wa[m])):
        strike = float(Ka[m][i])
        if strike in seen:  # one finding per listed strike (it may be a node of both)
            continue
        seen.add(strike)
        out.append(Finding("calendar", long.expiry, strike, float(gap[i])))
    return out


def check(smiles: Sequence[Smile]) -> list[Finding]:
    """Every finding of a published surface: butterflies per expiry, calendars between
    neighbouring expiries (sorted by ``T``)."""
    live = sorted((s for s in smiles if s.T > 0 and math.isfinite(s.T)), key=lambda s: s.T)
    out: list[Finding] = []
    for s in live:
        out.extend(butterfly(s))
    for a, b in itertools.pairwise(live):
        out.extend(calendar(a, b))
    return out


def smiles_of_greeks(payloads: Sequence[Mapping[str, Any]]) -> list[Smile]:
    """The published surface as greeks payloads describe it (``streamer.greeks/1``)."""
    out = []
    for p in payloads:
        rows = p.get("instruments", ())
        T, F = p.get("T"), p.get("forward")
        if T is None or F is None or not rows:
            continue
        out.append(
            Smile(
                expiry=str(p.get("expiry", "")),
                T=float(T),
                forward=float(F),
                strike=np.array([float(r["strike"]) for r in rows]),
                iv=np.array([math.nan if r["iv"] is None else float(r["iv"]) for r in rows]),
            )
        )
    return out
