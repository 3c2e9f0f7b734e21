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


@dataclass(frozen=True)
class Failure:
    """Why a strategy accepted nothing (the calibrator then keeps its last good fit)."""

    message: str
    nfev: int = 0
    violations: list[Violation] = field(default_factory=list)


def accepted(model: str, ts_ms: int, prep: Prepared, t0: float, fit: Fitted) -> FitResult:
    """The result of a fit that passed the gate (errors over the kept slices' quotes)."""
    data, pts, iv = prep.data, fit.points, fit.iv
    resid = iv[pts] - data.iv[pts]
    band = in_band(iv[pts], data.iv_bid[pts], data.iv_ask[pts])
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
        rmse_iv=float(np.sqrt(np.mean(resid * resid))) if resid.size else math.nan,
        in_band=float(np.mean(band)) if band.size else math.nan,
        n_quotes=int(pts.sum()),
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
) -> tuple[SliceFit, ...]:
    """The kept slices' results: RMS of (fitted - mid IV), in-band share, quotes, in one pass."""
    S = data.n_slices
    n = np.bincount(data.slice_idx, minlength=S)
    r = iv - data.iv
    sq = np.bincount(data.slice_idx, weights=r * r, minlength=S)
    inside = np.bincount(data.slice_idx, weights=in_band(iv, data.iv_bid, data.iv_ask), minlength=S)
    # Python scalars once per array (np.sqrt and math.sqrt are both IEEE's correctly
    # rounded square root: the same values as before)
    m = np.maximum(n, 1).tolist()
    sq_l, in_l, n_l = sq.tolist(), inside.tolist(), n.tolist()
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


def block_band(iv: FloatArray, data: FitData, starts: IntArray) -> FloatArray:
    """Per block: share of fitted IVs inside the bid-ask band."""
    inside = in_band(iv, data.iv_bid, data.iv_ask)
    counts = np.diff(np.append(starts, len(iv)))
    sums = np.add.reduceat(inside, starts) if len(starts) > 1 else np.array([inside.sum()])
    return np.asarray(sums / np.maximum(counts, 1))
