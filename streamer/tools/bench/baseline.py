"""Per-slice scipy fits beside the daemon's: the plain SVI baseline and each model's ceiling.

Both fit each expiry of a chain alone, with ``scipy.optimize.least_squares``, to the quotes the
measure scores (``streamer.tools.bench.measure.Scored``: two-sided, OTM, T >= 2 h; no other
filter), and have no arbitrage constraints:

* ``svi_baseline``: raw SVI (Gatheral 2004, written out here, not the package's model) on the
  mid IVs, residuals in half-spreads (spread-weighted; IV residuals are price residuals over
  vega), from a few fixed starts, the best kept. The "plain per-slice SVI" a new user would
  fit first.
* ``ceiling``: a registered per-expiry model (its ``implied_vol`` inside its ``bounds``)
  with a band objective (nothing inside the inner ``DEAD_ZONE`` of the bid-ask band, the
  distance beyond it in half-spreads outside under Cauchy's loss, plus a ``KAPPA`` pull to
  the mid), from ``N_STARTS`` starts: the
  model's own guesses, then uniform draws in its (finite) bounds. What the model's family
  can reach on the measure at best.

Each returns, per expiry with scored quotes, a callable ``k -> iv`` evaluated at every
instrument of that expiry (the measure then scores the same instruments).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from scipy.optimize import least_squares

from streamer.models.base import FitData, Model
from streamer.tools.bench.measure import Scored

FloatArray = npt.NDArray[np.float64]
SliceFn = Callable[[FloatArray], FloatArray]  # k -> iv of one expiry
N_STARTS = 12
KAPPA = 0.02
DEAD_ZONE = 0.8  # of the half-spread: the band fit aims inside the band, not at its edge
HALF_FLOOR = 1e-4  # in vol: a zero-width band still gets a finite weight


def raw_svi_iv(x: FloatArray, k: FloatArray, T: float) -> FloatArray:
    a, b, rho, m, sig = x
    w = a + b * (rho * (k - m) + np.sqrt((k - m) ** 2 + sig * sig))
    return np.asarray(np.sqrt(np.maximum(w, 1e-12) / T))


def raw_svi_jac(x: FloatArray, k: FloatArray, T: float) -> FloatArray:
    """``d iv / d (a, b, rho, m, sigma)`` of ``raw_svi_iv``."""
    _, b, rho, m, sig = x
    d = k - m
    r = np.sqrt(d * d + sig * sig)
    iv = raw_svi_iv(x, k, T)
    cols = [np.ones_like(k), rho * d + r, b * d, -b * (rho + d / r), b * sig / r]
    return np.stack(cols, axis=1) / (2.0 * T * iv)[:, None]


_SVI_LO = np.array([-1.0, 0.0, -0.999, -3.0, 1e-4])
_SVI_HI = np.array([4.0, 5.0, 0.999, 3.0, 5.0])


def _slices(s: Scored) -> list[tuple[int, npt.NDArray[np.bool_]]]:
    return [(int(e), s.expiry_idx == e) for e in np.unique(s.expiry_idx)]


def svi_baseline(s: Scored) -> dict[int, SliceFn]:
    """Per expiry (snapshot expiry index): the plain SVI fit on the mids."""
    out: dict[int, SliceFn] = {}
    for e, m in _slices(s):
        k, T = s.k[m], float(s.T[m][0])
        mid, half = s.mid_iv[m], np.maximum(0.5 * (s.ask_iv[m] - s.bid_iv[m]), HALF_FLOOR)
        atm_w = float(np.interp(0.0, k, (mid * mid * T))) if len(k) > 1 else float(mid[0] ** 2 * T)
        best: tuple[float, FloatArray] | None = None
        for m0, s0 in ((0.0, 0.1), (0.0, 0.3), (-0.1, 0.05), (0.1, 0.2)):
            x0 = np.array([0.5 * atm_w, 0.1, -0.3, m0, s0])
            x0 = np.clip(x0, _SVI_LO + 1e-9, _SVI_HI - 1e-9)

            def res(
                x: FloatArray, k: FloatArray = k, T: float = T, mid: FloatArray = mid,
                half: FloatArray = half,
            ) -> FloatArray:  # fmt: skip
                return np.asarray((raw_svi_iv(x, k, T) - mid) / half)

            def jac(
                x: FloatArray, k: FloatArray = k, T: float = T, half: FloatArray = half
            ) -> FloatArray:
                return raw_svi_jac(x, k, T) / half[:, None]

            r = _solve(res, x0, _SVI_LO, _SVI_HI, jac)
            if r is not None and (best is None or r[0] < best[0]):
                best = r
        if best is not None:
            out[e] = _svi_fn(best[1], T)
    return out


def _svi_fn(x: FloatArray, T: float) -> SliceFn:
    return lambda k: raw_svi_iv(x, np.asarray(k, dtype=np.float64), T)


def ceiling(model: Model, s: Scored, seed: int = 0) -> dict[int, SliceFn]:
    """Per expiry: the best of ``N_STARTS`` band-objective fits of a per-expiry model."""
    if not model.per_expiry:
        return {}
    rng = np.random.default_rng(seed)
    lo, hi = (np.asarray(b, dtype=np.float64) for b in model.bounds(1))
    lo_f = np.where(np.isfinite(lo), lo, -5.0)
    hi_f = np.where(np.isfinite(hi), hi, 5.0)
    out: dict[int, SliceFn] = {}
    for e, m in _slices(s):
        data = _fit_data(s, m)
        k, T = data.k, float(data.slice_T[0])
        Tk = np.full(k.shape, T)
        zero = np.zeros(k.shape, dtype=np.int64)
        mid = data.iv
        half = np.maximum(0.5 * (data.iv_ask - data.iv_bid), HALF_FLOOR)
        bid, ask = mid - DEAD_ZONE * half, mid + DEAD_ZONE * half
        try:
            starts = [np.asarray(g, dtype=np.float64) for g in model.initial_guesses(data)]
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            starts = []
        starts = starts[:N_STARTS]
        while len(starts) < N_STARTS:
            starts.append(lo_f + rng.random(len(lo)) * (hi_f - lo_f))

        def res(
            x: FloatArray,
            k: FloatArray = k,
            Tk: FloatArray = Tk,
            zero: npt.NDArray[np.int64] = zero,
            bid: FloatArray = bid,
            ask: FloatArray = ask,
            mid: FloatArray = mid,
            half: FloatArray = half,
        ) -> FloatArray:
            iv = model.implied_vol(x, k, Tk, zero)
            out_of_band = iv - np.clip(iv, bid, ask)
            r = (out_of_band + KAPPA * (iv - mid)) / half
            return robust(np.where(np.isfinite(r), r, 1e3))[0]

        def jac(
            x: FloatArray,
            k: FloatArray = k,
            Tk: FloatArray = Tk,
            zero: npt.NDArray[np.int64] = zero,
            bid: FloatArray = bid,
            ask: FloatArray = ask,
            mid: FloatArray = mid,
            half: FloatArray = half,
        ) -> FloatArray:
            iv = model.implied_vol(x, k, Tk, zero)
            J = model.jacobian(x, k, Tk, zero)
            assert J is not None
            r = (iv - np.clip(iv, bid, ask) + KAPPA * (iv - mid)) / half
            slope = ((iv < bid) | (iv > ask)).astype(np.float64) + KAPPA
            dg = robust(np.where(np.isfinite(r), r, 1e3))[1]
            return np.asarray(np.nan_to_num(J * (dg * slope / half)[:, None]))

        has_jac = model.jacobian(starts[0], k, Tk, zero) is not None
        w_mid = 1.0 / np.maximum(half, 0.0025)

        def res_mid(
            x: FloatArray, k: FloatArray = k, Tk: FloatArray = Tk, w: FloatArray = w_mid,
            mid: FloatArray = mid,
        ) -> FloatArray:  # fmt: skip
            r = (model.implied_vol(x, k, Tk, np.zeros(k.shape, dtype=np.int64)) - mid) * w
            return robust(np.where(np.isfinite(r), r, 1e3))[0]

        # the model's guesses are refined on the mids first (a two-stage fit); those mid
        # fits are candidates too
        n_guess = min(len(starts), 3)
        pre: list[tuple[float, FloatArray]] = []
        inner = (lo + 1e-9 * (hi_f - lo_f), hi - 1e-9 * (hi_f - lo_f))
        for i, start in enumerate(starts):
            x0 = np.clip(start, *inner)
            if i < n_guess:
                r = _solve(res_mid, x0, lo, hi)
                if r is not None:
                    pre.append(r)
                    x0 = np.clip(r[1], *inner)
            r = _solve(res, x0, lo, hi, jac if has_jac else None)
            if r is not None:
                pre.append(r)
        best: tuple[float, float, FloatArray] | None = None
        for r in pre:
            # the start whose fit puts most quotes in the band wins (then the lower cost)
            iv = _model_fn(model, r[1], T)(k)
            misses = float(np.sum(~((iv >= data.iv_bid) & (iv <= data.iv_ask))))
            if best is None or (misses, r[0]) < (best[0], best[1]):
                best = (misses, r[0], r[1])
        if best is not None:
            out[e] = _model_fn(model, best[2], T)
    return out


def robust(r: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Cauchy's loss as a residual transform, ``g(r) = sign(r) sqrt(ln(1 + r^2))`` (so that
    ``g^2`` is the loss: a quote far outside its band costs little more than one just
    outside, as a count of misses would), and ``g'(r)``."""
    r2 = r * r
    g = np.sign(r) * np.sqrt(np.log1p(r2))
    with np.errstate(invalid="ignore", divide="ignore"):
        dg = np.where(r2 > 1e-12, np.abs(r) / ((1.0 + r2) * np.abs(g)), 1.0)
    return np.asarray(g), np.asarray(dg)


def _model_fn(model: Model, x: FloatArray, T: float) -> SliceFn:
    def fn(k: FloatArray) -> FloatArray:
        k = np.asarray(k, dtype=np.float64)
        with np.errstate(all="ignore"):
            iv = model.implied_vol(x, k, np.full(k.shape, T), np.zeros(k.shape, dtype=np.int64))
        return np.asarray(iv, dtype=np.float64)

    return fn


def _fit_data(s: Scored, m: npt.NDArray[np.bool_]) -> FitData:
    bid, ask = s.bid_iv[m], s.ask_iv[m]
    T = float(s.T[m][0])
    n = int(m.sum())
    order = np.argsort(s.k[m])
    return FitData(
        k=s.k[m][order],
        T=np.full(n, T),
        slice_idx=np.zeros(n, dtype=np.int64),
        iv=(0.5 * (bid + ask))[order],
        iv_bid=bid[order],
        iv_ask=ask[order],
        weight=(1.0 / np.maximum(0.5 * (ask - bid), 0.005))[order],
        is_call=(s.k[m] > 0)[order],
        slice_T=np.array([T]),
        slice_forward=np.array([1.0]),
    )


def _solve(
    res: Callable[[FloatArray], FloatArray],
    x0: FloatArray,
    lo: FloatArray,
    hi: FloatArray,
    jac: Callable[[FloatArray], FloatArray] | None = None,
) -> tuple[float, FloatArray] | None:
    """``least_squares`` inside the box: MINPACK's Levenberg-Marquardt on the unbounded
    variables ``u`` of ``x = lo + (hi - lo) (1 + sin u) / 2`` (MINUIT's transform; infinite
    bounds: ``x = u``), or the trust-region reflective method when there are fewer residuals
    than parameters."""
    fin = np.isfinite(lo) & np.isfinite(hi)
    span = np.where(fin, hi - lo, 1.0)
    base = np.where(fin, lo, 0.0)

    def to_x(u: FloatArray) -> FloatArray:
        return np.asarray(np.where(fin, base + span * 0.5 * (1.0 + np.sin(u)), u))

    ratio = np.clip(np.where(fin, (x0 - base) / span, 0.5) * 2.0 - 1.0, -1.0, 1.0)
    u0 = np.where(fin, np.arcsin(ratio), x0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            if len(res(x0)) >= len(x0):
                jac_u: Callable[[FloatArray], FloatArray] | str = "2-point"
                if jac is not None:
                    jx = jac

                    def jac_u(u: FloatArray) -> FloatArray:
                        dxdu = np.where(fin, span * 0.5 * np.cos(u), 1.0)
                        return jx(to_x(u)) * dxdu[None, :]

                r = least_squares(
                    lambda u: res(to_x(u)), u0, jac=jac_u, method="lm", xtol=1e-8,
                    ftol=1e-8, max_nfev=100 * len(x0),
                )  # fmt: skip
                x = to_x(np.asarray(r.x, dtype=np.float64))
            else:
                r = least_squares(res, np.clip(x0, lo, hi), bounds=(lo, hi), method="trf")
                x = np.asarray(r.x, dtype=np.float64)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            return None
    cost = float(r.cost)
    return (cost, x) if math.isfinite(cost) else None


def evaluate(
    fns: dict[int, SliceFn], k_all: FloatArray, expiry_idx: npt.NDArray[np.int64]
) -> FloatArray:
    """IV per instrument of a snapshot (log-moneyness ``k_all`` against its expiry's forward)
    from the per-expiry fits (NaN for expiries without one)."""
    out = np.full(len(k_all), math.nan)
    for e, fn in fns.items():
        m = expiry_idx == e
        if m.any():
            out[m] = fn(k_all[m])
    return out
