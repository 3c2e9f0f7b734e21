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
proportional-dividend case), checked on the two expiries' common ``k`` range at each one's
strikes, the other's ``w`` linearly interpolated in ``k``.

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
    amount: float  # price per unit of forward (butterfly checks), total variance (calendar)


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


def calendar(short: Smile, long: Smile) -> list[Finding]:
    """Total variance of ``long`` below that of ``short`` at fixed ``k`` (common range)."""
    out: list[Finding] = []
    Ka, iva = short.clean()
    Kb, ivb = long.clean()
    if len(Ka) < 1 or len(Kb) < 2 or not (short.forward > 0 and long.forward > 0):
        return out
    ka, wa = np.log(Ka / short.forward), iva * iva * short.T
    kb, wb = np.log(Kb / long.forward), ivb * ivb * long.T
    lo, hi = max(ka[0], kb[0]), min(ka[-1], kb[-1])
    if not lo < hi:
        return out
    seen: set[float] = set()
    for k_nodes, K_nodes, own_is_short in ((ka, Ka, True), (kb, Kb, False)):
        m = (k_nodes >= lo) & (k_nodes <= hi)
        kk = k_nodes[m]
        if own_is_short:
            w_short, w_long = wa[m], np.interp(kk, kb, wb)
        else:
            if len(ka) < 2:
                continue
            w_short, w_long = np.interp(kk, ka, wa), wb[m]
        gap = w_short - w_long
        tol = W_TOL_ABS + W_TOL_REL * np.maximum(w_short, w_long)
        for i in np.flatnonzero(gap > tol):
            strike = float(K_nodes[m][i])
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
