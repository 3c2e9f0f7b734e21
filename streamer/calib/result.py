"""What a calibration returns: ``FitResult`` (per slice ``SliceFit``), and how it is built.

Like scipy's ``OptimizeResult``: ``success``, ``status`` (``ok`` | ``degraded``), ``message``,
``nfev``, and the fit itself (per-slice parameters, fitted IVs, diagnostics). ``accepted``
builds the result of a fit that passed the gate, ``failed`` the one of a fit that did not
(the calibrator then re-stamps its last good fit ``degraded``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from numba import njit

from streamer.calib.data import Prepared, in_band
from streamer.models.base import FitData, FloatArray, IntArray, Violation


@dataclass(frozen=True)
class SliceFit:
    """One expiry of a fit."""

    expiry: str
    expiry_ms: int
    T: float
    forward: float
    params: dict[str, float]
    atm_iv: float
    rmse_iv: float
    in_band: float
    n_quotes: int


@dataclass(frozen=True)
class FitResult:
    """What one calibration produced (or, when not accepted, the last good fit re-stamped)."""

    model: str
    ts_ms: int
    success: bool
    status: str  # "ok" | "degraded"
    message: str
    params: dict[str, float]  # surface-wide
    slices: tuple[SliceFit, ...]
    x: tuple[FloatArray, ...]  # per-expiry: one vector per slice; surface: one vector
    nfev: int
    elapsed_ms: float
    rmse_iv: float
    in_band: float
    n_quotes: int
    penalty: float
    warm: bool
    regime_shift: bool
    violations: tuple[Violation, ...] = ()
    drops: Counter[str] = field(default_factory=Counter)
    fitted_iv: FloatArray = field(default_factory=lambda: np.zeros(0))
    prepared: Prepared | None = None

    @property
    def expiries(self) -> tuple[str, ...]:
        return tuple(s.expiry for s in self.slices)


@dataclass(frozen=True)
class Fitted:
    """An accepted fit before it becomes a ``FitResult``: what the strategies hand back."""

    iv: FloatArray  # fitted IV per quote
    points: npt.NDArray[np.bool_]  # the quotes of the kept slices
    slices: tuple[SliceFit, ...]
    x: tuple[FloatArray, ...]
    params: dict[str, float]
    nfev: int
    penalty: float
    warm: bool
    regime: bool
    violations: list[Violation]
    # (RMS of fitted - mid IV, in-band share, quotes) over ``points`` when the strategy has
    # them already (``block_stats``); None: ``accepted`` computes them
    totals: tuple[float, float, int] | None = None


@dataclass(frozen=True)
class Failure:
    """Why a strategy accepted nothing (the calibrator then keeps its last good fit)."""

    message: str
    nfev: int = 0
    violations: list[Violation] = field(default_factory=list)


def accepted(model: str, ts_ms: int, prep: Prepared, t0: float, fit: Fitted) -> FitResult:
    """The result of a fit that passed the gate (errors over the kept slices' quotes)."""
    data, pts, iv = prep.data, fit.points, fit.iv
    if fit.totals is not None:
        rmse, band_share, n_quotes = fit.totals
    else:
        resid = iv[pts] - data.iv[pts]
        band = in_band(iv[pts], data.iv_bid[pts], data.iv_ask[pts])
        rmse = float(np.sqrt(np.mean(resid * resid))) if resid.size else math.nan
        band_share = float(np.mean(band)) if band.size else math.nan
        n_quotes = int(pts.sum())
    n = len(fit.violations)
    return FitResult(
        model=model,
        ts_ms=ts_ms,
        success=True,
        status="ok",
        message="ok" if not n else f"{n} arbitrage finding(s) handled",
        params=fit.params,
        slices=fit.slices,
        x=fit.x,
        nfev=fit.nfev,
        elapsed_ms=(time.perf_counter() - t0) * 1e3,
        rmse_iv=rmse,
        in_band=band_share,
        n_quotes=n_quotes,
        penalty=fit.penalty,
        warm=fit.warm,
        regime_shift=fit.regime,
        violations=tuple(fit.violations),
        drops=prep.drops,
        fitted_iv=iv,
        prepared=prep,
    )


def failed(
    model: str,
    ts_ms: int,
    message: str,
    prep: Prepared,
    t0: float,
    nfev: int = 0,
    violations: list[Violation] | None = None,
) -> FitResult:
    """The result of a fit that was not accepted (nothing in it to publish)."""
    return FitResult(
        model=model,
        ts_ms=ts_ms,
        success=False,
        status="degraded",
        message=message,
        params={},
        slices=(),
        x=(),
        nfev=nfev,
        elapsed_ms=(time.perf_counter() - t0) * 1e3,
        rmse_iv=math.nan,
        in_band=math.nan,
        n_quotes=0,
        penalty=0.0,
        warm=False,
        regime_shift=False,
        violations=tuple(violations or ()),
        drops=prep.drops,
        prepared=prep,
    )


def slice_fits(
    data: FitData,
    prep: Prepared,
    iv: FloatArray,
    atm: FloatArray,
    params: list[dict[str, float]],
    keep: npt.NDArray[np.bool_],
    stats: FloatArray | None = None,
) -> tuple[SliceFit, ...]:
    """The kept slices' results: RMS of (fitted - mid IV), in-band share, quotes, in one pass
    (``stats``: ``block_stats`` of ``iv`` when already computed)."""
    if stats is None:
        stats = block_stats(iv, data, starts_of(data.slice_idx, data.n_slices))
    # Python scalars once per array (np.sqrt and math.sqrt are both IEEE's correctly
    # rounded square root)
    n_l, sq_l, in_l = stats[:, 0].tolist(), stats[:, 1].tolist(), stats[:, 2].tolist()
    m = [max(v, 1.0) for v in n_l]
    ms, Ts, Fs, atms = (
        prep.expiry_ms.tolist(), data.slice_T.tolist(), data.slice_forward.tolist(), atm.tolist()
    )  # fmt: skip
    return tuple(
        SliceFit(
            expiry=data.slice_expiry[j],
            expiry_ms=int(ms[j]),
            T=float(Ts[j]),
            forward=float(Fs[j]),
            params=params[j],
            atm_iv=float(atms[j]),
            rmse_iv=math.sqrt(sq_l[j] / m[j]),
            in_band=float(in_l[j] / m[j]),
            n_quotes=int(n_l[j]),
        )
        for j, k in enumerate(keep.tolist())
        if k
    )


def starts_of(slice_idx: IntArray, S: int) -> IntArray:
    """First quote of each of ``S`` slices (quotes sorted by slice)."""
    return np.searchsorted(slice_idx, np.arange(S)).astype(np.int64)


def block_wrms(iv: FloatArray, data: FitData, starts: IntArray) -> FloatArray:
    """Per block: the weighted RMS of (fitted - target) (non-finite counts as 1e6)."""
    r = data.weight * (iv - data.iv)
    r = np.where(np.isfinite(r), r, 1e6)
    counts = np.diff(np.append(starts, len(r)))
    sums = np.add.reduceat(r * r, starts) if len(starts) > 1 else np.array([np.sum(r * r)])
    return np.asarray(np.sqrt(sums / np.maximum(counts, 1)))


def block_stats(iv: FloatArray, data: FitData, starts: IntArray) -> FloatArray:
    """``(S, 4)`` per block (quotes sorted by block, ``starts``): quotes, sum of
    (fitted - mid IV)^2, quotes with the fitted IV inside the bid-ask band, and sum of the
    weighted squares ``block_wrms`` takes (non-finite as 1e6): one compiled pass for
    ``block_wrms``, ``slice_fits`` and the fit's totals (sums in quote order, as
    ``np.bincount``)."""
    return np.asarray(_block_sums(iv, data.iv, data.iv_bid, data.iv_ask, data.weight, starts))


def wrms_of(stats: FloatArray) -> FloatArray:
    """``block_wrms`` from ``block_stats``."""
    return np.asarray(np.sqrt(stats[:, 3] / np.maximum(stats[:, 0], 1.0)))


@njit(cache=True, nogil=True)
def _block_sums(
    iv: np.ndarray,
    target: np.ndarray,
    bid: np.ndarray,
    ask: np.ndarray,
    weight: np.ndarray,
    starts: np.ndarray,
) -> np.ndarray:
    S = starts.shape[0]
    n = iv.shape[0]
    out = np.zeros((S, 4))
    for b in range(S):
        lo = starts[b]
        hi = starts[b + 1] if b + 1 < S else n
        out[b, 0] = hi - lo
        for i in range(lo, hi):
            r = iv[i] - target[i]
            out[b, 1] += r * r
            if iv[i] >= bid[i] and iv[i] <= ask[i]:
                out[b, 2] += 1.0
            wr = weight[i] * r
            if not math.isfinite(wr):
                wr = 1e6
            out[b, 3] += wr * wr
    return out


def block_band(iv: FloatArray, data: FitData, starts: IntArray) -> FloatArray:
    """Per block: share of fitted IVs inside the bid-ask band."""
    inside = in_band(iv, data.iv_bid, data.iv_ask)
    counts = np.diff(np.append(starts, len(iv)))
    sums = np.add.reduceat(inside, starts) if len(starts) > 1 else np.array([inside.sum()])
    return np.asarray(sums / np.maximum(counts, 1))
