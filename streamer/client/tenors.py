r"""Constant-maturity tenors and the 30-day vol index: the numbers traders read off a surface.

Pure maths on *smiles*: a smile is a function ``k -> iv`` of log-moneyness ``k = ln(K/F)`` at
one maturity ``T`` (years), against that maturity's forward ``F``. ``Surface.tenor`` and
``Surface.vol_index`` (``streamer.client.surface``) feed it the surface's own smiles; a bot
can feed it any smile of its own. IVs are fractions (0.62), never percent.

Tenor at ``days`` (``T = days / 365``, ACT/365 like every ``T`` here)
------------------------------------------------------------------------
* ``forward``: the surface's forward at ``T`` (log-linear in ``T`` between fitted expiries).
* ``atm_iv = iv(0)``: at the forward (``k = 0``), not the delta-neutral straddle strike.
* Delta is the undiscounted forward Black delta of a call, ``N(d1)``, with
  ``d1(k) = -k / sqrt(w(k)) + sqrt(w(k)) / 2`` and ``w(k) = iv(k)^2 T``: Deribit's own
  (``delta`` in its tickers), not premium-adjusted; a put's is ``N(d1) - 1``. The strike of a
  delta is solved on the smile ("smile delta"): ``d1`` depends on the smile's own IV there, so
  the call of delta ``X`` sits where ``d1(k) = N^-1(X)`` and the put of delta ``-X`` where
  ``d1(k) = N^-1(1 - X)``. ``delta_log_moneyness`` solves it: a bracket from the smile on a
  grid of ``k`` (the caller's, e.g. the surface's butterfly-check grid of +-3 ATM standard
  deviations, else 257 points over +-8, widened 4x at a time, at most twice), the sign change
  nearest the forward; inside it inverse cubic interpolation through the four grid points
  around the bracket and one Newton step with that interpolant's slope, accepted only if the
  smile there gives ``|d1 - d1*| <= 1e-12``, else regula falsi with the Illinois step (Dowell
  and Jarratt 1971) in the bracket to that tolerance (two smile calls per tenor for all four
  strikes, typically). Under no static arbitrage both ``d1`` and ``d2`` decrease strictly
  in ``k`` (Fukasawa 2012, "The normalizing transformations of the implied volatility
  smile", Math. Finance 22), so the root is unique; the bracket keeps the solver safe on a
  smile that is not.
* ``rrX = iv(call delta X) - iv(put delta -X)``; ``bfX = (iv(call X) + iv(put -X)) / 2 -
  atm_iv`` for X = 25 and 10 delta. This is the "smile strangle" of Reiswich and Wystup (2010,
  "A guide to FX options quoting conventions", J. Derivatives 18), not the FX broker's
  "market strangle", and its ATM is the forward (crypto desks' and Deribit's habit).
* Anything not finite (no root, a smile that returns NaN) is ``None``; ``Surface.tenor`` also
  returns ``None`` values for a ``T`` outside the fitted expiries (no extrapolation on the
  wire).

Vol index (``vol_index_30d``): the variance-swap rate at 30 days
----------------------------------------------------------------
The fair variance of a variance swap to ``T`` is the price of the log contract, replicated by
out-of-the-money options (Carr and Madan 1998, "Towards a theory of volatility trading";
Demeterfi, Derman, Kamal and Zou 1999, "More than you ever wanted to know about volatility
swaps"); with undiscounted prices (``r = 0``: Deribit's premiums are forward values)::

    sigma^2 T = 2 * integral_0^inf OTM(K) / K^2 dK        (puts below F, calls above)
              = 2 * integral otm(k) e^{-k} dk,            otm(k) = OTM(F e^k) / F

Our recipe, on the fitted smiles (continuous strikes):

1. The expiries: the fitted expiry at or just below 30 days and the one just above (if 30
   days is a fitted expiry, that one alone). None if 30 days lies outside the fitted range.
2. Per expiry, ``w_VS = 2 * integral otm(k) e^{-k} dk`` with the smile's own Black prices
   (``streamer.pricing.black_price``, per unit forward), in two pieces split at the forward
   (``otm`` has a kink there), each by composite Simpson: ``VS_INTERVALS`` (200) intervals
   over ``VS_RANGE_SD`` (10) ATM standard deviations ``sqrt(w(0))``; then, while the
   integrand at the end still exceeds ``VS_TAIL`` (1e-10) of its value at the forward, one
   more panel of twice the reach with ``VS_PANEL_INTERVALS`` (50) intervals (at most 5,
   never beyond ``|k| = VS_MAX_K = 20``). Where the smile stops answering far out (NaN
   beyond ``VS_INNER_SD`` = 3 ATM standard deviations: e.g. Heston's COS prices deep out of
   the money fall below their precision) the integrand is taken as zero from there on; a
   NaN nearer the money gives no index. Against adaptive quadrature of the same Black
   prices (tests/test_tenors.py) that is good to a few 1e-9 of the variance on 1-day to
   3-month SVI smiles, a few 1e-8 on fat-winged ones of a year and more.
3. Total variance linear in ``T`` between the two: ``w_30 = w_1 + (w_2 - w_1) (T_30 - T_1) /
   (T_2 - T_1)``, ``vol_index_30d = sqrt(w_30 / T_30)`` with ``T_30 = 30 / 365``. That is the
   CBOE VIX interpolation (Cboe, "VIX White Paper", 2003/2019: ``sigma^2 = [T_1 sigma_1^2
   (N_T2 - N_30) / (N_T2 - N_T1) + T_2 sigma_2^2 (N_30 - N_T1) / (N_T2 - N_T1)] N_365 /
   N_30``, in minutes) written in years.

How it differs from Deribit's DVOL (the VIX recipe on Deribit's BTC/ETH options: Deribit,
"DVOL - Deribit Implied Volatility Index", insights.deribit.com, 2021) and from the VIX:
they sum over *listed* strikes, ``(2/T) sum dK_i / K_i^2 Q(K_i) - (1/T) (F/K_0 - 1)^2``
(``Q`` the quote's mid, ``K_0`` the listed strike just below ``F``, the second term undoing
the in-the-money half of ``K_0``), cut the wings where the quotes stop (the VIX stops after
two consecutive zero bids; DVOL applies its own filters and smoothing, which we do not
reproduce) and pick the expiries by their own rules (the VIX: between 23 and 37 days). We
integrate the fitted, arbitrage-free smiles over continuous strikes, so the index does not
jump when a strike is listed or a far quote vanishes, and the wings beyond the last quote are
the model's (a fat-winged fit raises the index, a listed-strike sum would drop them). On the
shared Deribit chains (tests/test_tenors_deribit.py's, SVI) ours lies above such a
listed-strike sum over Deribit's own marks by -0.2 to +1 vol point on BTC (+2.1 once, where
the fit's wings were fat) and by 2 to 5 on ETH, whose wings run far beyond the last listed
strike: the index is only as good as the fitted wings. As a fraction (0.55), where DVOL is
quoted in percent (55).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.special import ndtri

from streamer.config import DEFAULT_TENORS_DAYS as _DEFAULT_TENORS_DAYS
from streamer.pricing import black_price

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Smile = Callable[[FloatArray], FloatArray]  # log-moneyness -> implied vol, at one maturity

DAYS_PER_YEAR = 365.0
DEFAULT_TENORS_DAYS: tuple[int, ...] = _DEFAULT_TENORS_DAYS  # the daemon's default too
VOL_INDEX_DAYS = 30
DELTAS = (0.25, 0.10)  # the risk reversals and butterflies: 25 and 10 delta

GRID_SD = 8.0  # the delta solver's bracketing grid: +-8 ATM standard deviations ...
GRID_POINTS = 257  # ... on this many points
GRID_WIDENINGS = 2  # widened 4x at a time when no sign change is found
ROOT_TOL = 1e-12  # |d1 - d1*| at the root
ROOT_ITERATIONS = 100

VS_RANGE_SD = 10.0  # the variance-swap integral: +-10 ATM standard deviations ...
VS_INTERVALS = 200  # ... Simpson intervals each side of the forward
VS_WIDENINGS = 5  # the reach doubled at most this many times, while the integrand matters:
VS_PANEL_INTERVALS = 50  # each further panel [b, 2b] with this many intervals
VS_TAIL = 1e-10  # (relative to the integrand at the forward)
VS_MAX_K = 20.0  # never beyond |k| = 20 (strikes e^-20 .. e^20 times the forward)
VS_INNER_SD = 3.0  # a smile that fails within +-3 ATM standard deviations: no index


@dataclass(frozen=True, slots=True)
class Tenor:
    """One constant maturity: IVs as fractions, None where undefined (the module docstring)."""

    days: int
    T: float
    forward: float | None
    atm_iv: float | None
    rr25: float | None
    bf25: float | None
    rr10: float | None
    bf10: float | None

    def as_dict(self) -> dict[str, int | float | None]:
        """The wire form (``streamer.tenors/1``'s ``tenors`` entries)."""
        return {
            "days": self.days,
            "T": self.T,
            "forward": self.forward,
            "atm_iv": self.atm_iv,
            "rr25": self.rr25,
            "bf25": self.bf25,
            "rr10": self.rr10,
            "bf10": self.bf10,
        }


def tenor_years(days: int) -> float:
    """Years of a tenor of ``days`` (ACT/365)."""
    return days / DAYS_PER_YEAR


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def empty_tenor(days: int) -> Tenor:
    """A tenor outside the fitted range: every value None."""
    return Tenor(days, tenor_years(days), None, None, None, None, None, None)


def d1_of(smile: Smile, k: FloatArray, T: float) -> FloatArray:
    """``d1(k) = -k / sqrt(w) + sqrt(w) / 2`` with the smile's own total variance ``w``."""
    return _d1_iv(smile, k, T)[0]


def _d1_iv(smile: Smile, k: FloatArray, T: float) -> tuple[FloatArray, FloatArray]:
    """``d1`` and the smile's IV at ``k`` (one smile call)."""
    iv = np.asarray(smile(k), dtype=np.float64)
    sw = iv * math.sqrt(T)
    ok = sw > 0.0  # False for NaN too
    out = np.divide(-np.asarray(k, dtype=np.float64), sw, out=np.full(sw.shape, math.nan), where=ok)
    out[ok] += 0.5 * sw[ok]
    return np.asarray(out, dtype=np.float64), iv


def delta_log_moneyness(
    smile: Smile, T: float, call_deltas: npt.ArrayLike, atm_iv: float | None = None
) -> FloatArray:
    """Log-moneyness ``k`` where the call's forward Black delta ``N(d1(k))`` (the smile's own
    IV in ``d1``) equals each of ``call_deltas`` (in (0, 1)); a put of delta ``-X`` is the
    call delta ``1 - X``. NaN where the smile has no such point (module docstring: grid
    bracket nearest the forward, a polished interpolation, Illinois regula falsi where that
    falls short). ``atm_iv``: ``smile(0)`` if the caller has it already."""
    return _solve_deltas(smile, T, call_deltas, atm_iv)[0]


def _brackets(k: FloatArray, d1: FloatArray, target: FloatArray) -> tuple[FloatArray, IntArray]:
    """Per target, ``d1 - target`` on grid ``k`` and the index ``j`` of the sign change
    ``[k_j, k_j+1]`` nearest the forward (-1: none)."""
    g = d1[None, :] - target[:, None]  # (targets, grid)
    # a sign change between finite neighbours (g decreases in k on arbitrage-free smiles)
    change = np.isfinite(g[:, :-1]) & np.isfinite(g[:, 1:]) & (g[:, :-1] * g[:, 1:] <= 0.0)
    dist = np.where(change, np.abs(0.5 * (k[:-1] + k[1:]))[None, :], np.inf)
    best = np.argmin(dist, axis=1)
    found = np.isfinite(dist[np.arange(len(target)), best])
    return g, np.asarray(np.where(found, best, -1), dtype=np.int64)


def _solve_deltas(
    smile: Smile,
    T: float,
    call_deltas: npt.ArrayLike,
    atm_iv: float | None,
    grid: tuple[FloatArray, FloatArray] | None = None,
) -> tuple[FloatArray, FloatArray]:
    """``delta_log_moneyness`` and the smile's IV at each root (NaN where none)."""
    target = np.atleast_1d(np.asarray(ndtri(np.asarray(call_deltas, dtype=np.float64))))
    out, out_iv = np.full(target.shape, math.nan), np.full(target.shape, math.nan)
    if not (T > 0.0 and math.isfinite(T)) or target.size == 0:
        return out, out_iv
    atm = float(np.asarray(smile(np.zeros(1)))[0]) if atm_iv is None else float(atm_iv)
    s = atm * math.sqrt(T)
    if not (math.isfinite(s) and s > 0.0):
        return out, out_iv
    j = np.full(target.shape, -1, dtype=np.int64)
    k = g = np.zeros(0)
    if grid is not None:  # the caller's grid first
        k = np.asarray(grid[0], dtype=np.float64)
        sw = np.asarray(grid[1], dtype=np.float64) * math.sqrt(T)
        d1 = np.divide(-k, sw, out=np.full(k.shape, math.nan), where=sw > 0.0) + 0.5 * sw
        g, j = _brackets(k, d1, target)
    half = GRID_SD * s
    for _ in range(GRID_WIDENINGS + 1):
        if (j >= 0).all():
            break
        k = np.linspace(-half, half, GRID_POINTS)
        g, j = _brackets(k, _d1_iv(smile, k, T)[0], target)
        half *= 4.0  # (the brackets already found are found again on the wider grid)
    ok = np.flatnonzero(j >= 0)
    if ok.size:
        out[ok], out_iv[ok] = _polish(smile, T, target[ok], k, g[ok], j[ok])
    return out, out_iv


def _inverse_cubic(ks: list[float], gs: list[float]) -> tuple[float, float] | None:
    """``k`` at ``g = 0`` and ``dk/dg`` there, by Lagrange interpolation of ``k`` as a
    function of ``g`` through the points (``g`` strictly monotone, no ``g`` zero)."""
    n = len(gs)
    if any(v == 0.0 for v in gs):
        return None
    increasing = all(gs[i] < gs[i + 1] for i in range(n - 1))
    if not increasing and not all(gs[i] > gs[i + 1] for i in range(n - 1)):
        return None
    value = slope = 0.0
    for i in range(n):
        li, dli = 1.0, 0.0
        for m in range(n):
            if m != i:
                li *= -gs[m] / (gs[i] - gs[m])
                dli += -1.0 / gs[m]  # d/dg of log(g - g_m) at g = 0
        value += ks[i] * li
        slope += ks[i] * li * dli
    return value, slope


def _polish(
    smile: Smile, T: float, target: FloatArray, k: FloatArray, g: FloatArray, j: IntArray
) -> tuple[FloatArray, FloatArray]:
    """Roots of ``g`` (rows) bracketed by grid points ``j, j + 1``: inverse cubic
    interpolation through the four grid points around the bracket, one Newton step with
    its slope, checked by evaluation (two smile calls in all); the roots that do not meet
    ``ROOT_TOL`` go on by Illinois regula falsi in their bracket."""
    n, last = len(target), len(k) - 1
    a, b = k[j], k[j + 1]
    fa, fb = g[np.arange(n), j], g[np.arange(n), j + 1]
    x0 = np.empty(n)
    slopes = np.full(n, math.nan)
    for r in range(n):
        i = int(j[r])
        idx = [m for m in range(i - 1, i + 3) if 0 <= m <= last and math.isfinite(g[r, m])]
        est = _inverse_cubic([float(k[m]) for m in idx], [float(g[r, m]) for m in idx])
        lo, hi = float(a[r]), float(b[r])
        if est is not None and lo < est[0] < hi:
            x0[r], slopes[r] = est
        elif fa[r] == 0.0 or fb[r] == 0.0:  # a grid point is the root
            x0[r] = lo if fa[r] == 0.0 else hi
        else:  # regula falsi
            x0[r] = lo - float(fa[r]) * (hi - lo) / float(fb[r] - fa[r])
    d0, iv0 = _d1_iv(smile, x0, T)
    f0 = d0 - target
    done = np.abs(f0) <= ROOT_TOL
    x, iv = x0.copy(), iv0.copy()
    step = np.isfinite(f0) & np.isfinite(slopes) & ~done
    if step.any():
        x1 = x0.copy()
        x1[step] = x0[step] - f0[step] * slopes[step]
        inside = step & (x1 > np.minimum(a, b)) & (x1 < np.maximum(a, b))
        if inside.any():
            d1v, iv1 = _d1_iv(smile, x1[inside], T)
            f1 = d1v - target[inside]
            good = np.abs(f1) <= ROOT_TOL
            where = np.flatnonzero(inside)[good]
            x[where], iv[where], done[where] = x1[where], iv1[good], True
    rest = np.flatnonzero(~done)
    if rest.size:  # narrow the brackets with x0 (its sign is known), then Illinois
        for r in rest.tolist():
            if math.isfinite(f0[r]):
                if f0[r] * fa[r] > 0.0:
                    a[r], fa[r] = x0[r], f0[r]
                else:
                    b[r], fb[r] = x0[r], f0[r]
        x[rest] = _illinois(smile, T, target[rest], a[rest], b[rest], fa[rest], fb[rest])
        ok = np.isfinite(x[rest])
        if ok.any():
            iv[rest[ok]] = np.asarray(smile(x[rest[ok]]), dtype=np.float64)
        iv[rest[~ok]] = math.nan
    return x, iv


def _illinois(
    smile: Smile,
    T: float,
    target: FloatArray,
    a: FloatArray,
    b: FloatArray,
    fa: FloatArray,
    fb: FloatArray,
) -> FloatArray:
    """Regula falsi with the Illinois modification on brackets ``[a, b]`` of ``d1 = target``
    (``fa``, ``fb``: ``d1 - target`` at the ends, of opposite signs), every root at once: one
    smile call per iteration for all the roots still open (plain floats otherwise: these
    are a handful of numbers, numpy's per-call overhead would dominate)."""
    n = len(target)
    A, B, FA, FB = a.tolist(), b.tolist(), fa.tolist(), fb.tolist()
    goal = target.tolist()
    x = [A[i] if abs(FA[i]) <= abs(FB[i]) else B[i] for i in range(n)]
    open_ = [i for i in range(n) if min(abs(FA[i]), abs(FB[i])) > ROOT_TOL]
    side = [0] * n  # which end was kept last (-1 a, +1 b)
    for _ in range(ROOT_ITERATIONS):
        if not open_:
            break
        cs = []
        for i in open_:
            denom = FB[i] - FA[i]
            c = B[i] - FB[i] * (B[i] - A[i]) / denom if denom != 0.0 else math.nan
            if not min(A[i], B[i]) < c < max(A[i], B[i]):  # also NaN
                c = 0.5 * (A[i] + B[i])
            cs.append(c)
        fcs = (d1_of(smile, np.array(cs), T) - target[open_]).tolist()
        still = []
        for i, c_try, fc_try in zip(open_, cs, fcs, strict=True):
            c, fc = c_try, fc_try
            if not math.isfinite(fc):  # the smile failed inside the bracket: bisect
                c = 0.5 * (A[i] + B[i])
                fc = float(d1_of(smile, np.array([c]), T)[0]) - goal[i]
                if not math.isfinite(fc):
                    x[i] = math.nan
                    continue
            x[i] = c
            if fc * FA[i] > 0.0:  # the root lies in [c, b]: c replaces a
                if side[i] == 1:  # Illinois: b kept twice in a row, halve its value
                    FB[i] *= 0.5
                A[i], FA[i], side[i] = c, fc, 1
            else:
                if side[i] == -1:
                    FA[i] *= 0.5
                B[i], FB[i], side[i] = c, fc, -1
            if abs(fc) > ROOT_TOL and abs(B[i] - A[i]) > 1e-15 * (1.0 + abs(c)):
                still.append(i)
        open_ = still
    out = np.array(x, dtype=np.float64)
    out[open_] = math.nan  # not converged in ROOT_ITERATIONS
    return out


def smile_tenor(
    smile: Smile,
    days: int,
    T: float,
    forward: float,
    *,
    atm_iv: float | None = None,
    grid: tuple[FloatArray, FloatArray] | None = None,
) -> Tenor:
    """ATM, 25- and 10-delta risk reversals and butterflies of ``smile`` (at ``T``).

    ``atm_iv`` (``smile(0)``) and ``grid`` (increasing ``k`` and ``smile(k)`` there), where
    the caller has them already, save smile calls: the grid brackets the delta strikes
    when it reaches them (else the solver's own grid does)."""
    atm = float(np.asarray(smile(np.zeros(1)))[0]) if atm_iv is None else float(atm_iv)
    targets = [x for d in DELTAS for x in (d, 1.0 - d)]  # call X, put -X (call delta 1 - X)
    iv = _solve_deltas(smile, T, targets, atm, grid)[1]
    wings: list[float | None] = []
    for n in range(len(DELTAS)):
        call, put = float(iv[2 * n]), float(iv[2 * n + 1])
        wings += [_finite(call - put), _finite(0.5 * (call + put) - atm)]
    rr25, bf25, rr10, bf10 = wings
    return Tenor(
        days=days,
        T=T,
        forward=_finite(forward),
        atm_iv=_finite(atm),
        rr25=rr25,
        bf25=bf25,
        rr10=rr10,
        bf10=bf10,
    )


def _simpson(y: FloatArray, h: float) -> float:
    """Composite Simpson on an odd number of equally spaced values."""
    return float(h / 3.0 * (y[0] + y[-1] + 4.0 * y[1:-1:2].sum() + 2.0 * y[2:-1:2].sum()))


def _otm_integrand(smile: Smile, k: FloatArray, T: float) -> FloatArray:
    """``otm(k) e^{-k}``: the out-of-the-money undiscounted price per unit forward over K
    (puts for ``k < 0``, calls for ``k >= 0``)."""
    K = np.exp(k)
    iv = np.asarray(smile(k), dtype=np.float64)
    # every argument at full shape (no broadcasting inside streamer.pricing: numba warns
    # about np.broadcast_arrays views)
    n = k.shape
    price = np.asarray(black_price(np.ones(n), K, np.full(n, T), iv, k >= 0.0), dtype=np.float64)
    return np.asarray(price / K)


def variance_swap_variance(smile: Smile, T: float) -> float:
    """The variance swap's fair total variance ``sigma^2 T = 2 int otm(k) e^{-k} dk`` of
    ``smile`` at ``T`` (module docstring: range and rule); NaN if the smile fails.

    Three smile calls: the ATM IV (the scale), the integrand at the candidate ends of each
    side (the reach: the first end where it is below ``VS_TAIL`` of its value at the
    forward), then every panel of both sides at once."""
    if not (T > 0.0 and math.isfinite(T)):
        return math.nan
    atm = float(np.asarray(smile(np.zeros(1)), dtype=np.float64)[0])
    s = atm * math.sqrt(T)
    if not (math.isfinite(s) and s > 0.0):
        return math.nan
    ends = [min(VS_RANGE_SD * s * 2.0**m, VS_MAX_K) for m in range(VS_WIDENINGS + 1)]
    ends = sorted(set(ends))
    probe = _otm_integrand(smile, np.array([0.0, *(-e for e in ends), *ends]), T)
    peak, tails = float(probe[0]), (probe[1 : 1 + len(ends)], probe[1 + len(ends) :])
    pieces: list[FloatArray] = []
    spans: list[tuple[int, int, float]] = []  # (start, stop, step) of each panel in k
    sides: list[tuple[int, int]] = []  # (start, stop) of each side's points
    at = 0
    for sign, tail in ((-1.0, tails[0]), (1.0, tails[1])):
        first = at
        reach = len(ends) - 1
        for m, value in enumerate(tail.tolist()):
            if not value > VS_TAIL * peak:  # small enough (or NaN: found below)
                reach = m
                break
        lo = 0.0
        for m in range(reach + 1):
            n = VS_INTERVALS if m == 0 else VS_PANEL_INTERVALS
            pieces.append(np.linspace(sign * lo, sign * ends[m], n + 1))
            spans.append((at, at + n + 1, (ends[m] - lo) / n))
            at += n + 1
            lo = ends[m]
        sides.append((first, at))
    k = np.concatenate(pieces)
    y = _otm_integrand(smile, k, T)
    for a, b in sides:  # outward from the forward: where the smile stops answering ...
        bad = np.flatnonzero(~np.isfinite(y[a:b]))
        if bad.size:
            if abs(k[a + bad[0]]) < VS_INNER_SD * s:  # ... near the money: no index
                return math.nan
            y[a + bad[0] : b] = 0.0  # ... far out (its pricer's precision ends): nothing
    return 2.0 * sum(_simpson(y[a:b], h) for a, b, h in spans)


def vol_index(slices: Sequence[tuple[float, Smile]], days: int = VOL_INDEX_DAYS) -> float | None:
    """The ``days`` vol index from fitted slices ``(T_j, smile_j)`` sorted by ``T``: the
    variance-swap total variance of the two slices around ``days / 365``, linear in ``T``
    (module docstring). None outside the slices' range or where the integral fails."""
    T = tenor_years(days)
    Ts = [t for t, _ in slices]
    if not slices or not Ts[0] - 1e-12 <= T <= Ts[-1] + 1e-12:
        return None
    j = int(np.searchsorted(np.asarray(Ts), T, side="right")) - 1
    j = min(max(j, 0), len(slices) - 1)
    T1, smile1 = slices[j]
    w1 = variance_swap_variance(smile1, T1)
    if abs(T1 - T) <= 1e-12 or j == len(slices) - 1:  # 30 days is (to rounding) a slice
        w = w1 * T / T1
    else:
        T2, smile2 = slices[j + 1]
        w2 = variance_swap_variance(smile2, T2)
        w = w1 + (w2 - w1) * (T - T1) / (T2 - T1)
    if not (math.isfinite(w) and w > 0.0):
        return None
    return math.sqrt(w / T)
