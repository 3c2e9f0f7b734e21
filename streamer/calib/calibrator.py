"""The incremental calibrator: check the input, dispatch to a strategy, return a ``FitResult``.

One ``Calibrator`` per (underlying, model). ``fit(snapshot)``, like scipy's ``least_squares``
front door:

1. check: ``prepare`` filters the quotes and builds IV targets and weights
   (``streamer.calib.data``); no usable quotes is a ``degraded`` result, not an error (its
   message says what was dropped, by reason: ``no usable quotes (one_sided 336)``);
2. dispatch: per-expiry models (SVI, SABR, eSSVI, ...) to ``streamer.calib.per_expiry``, surface
   models (SSVI, Heston, Bates, ...) to ``streamer.calib.surface``. Both warm-start from the
   last accepted fit with the parameter-change penalty ``sqrt(lambda) (theta - theta_prev) / s``
   (DESIGN section 5), test for a regime shift (forward move, error jump, in-band slide,
   expiry roll, long gap) and then also fit penalty-free from the warm result and the cold
   guesses, keeping the better data fit (flagged ``regime_shift``); the penalty weight fades as
   ``horizon / dt`` for gaps beyond ``penalty_horizon_s``. The arbitrage gate
   (``streamer.calib.gate``) lets no fit with static arbitrage through;
3. result: an accepted fit becomes the new last good one (``FitResult``, ``status="ok"``); a
   failed, non-finite or arbitrage-carrying fit never replaces it: the result is then the last
   good fit re-stamped ``status="degraded"`` with the reason in ``message``.

State between fits lives in ``History`` (``streamer.calib.options``).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.data import Prepared, prepare
from streamer.calib.options import DEFAULT_PENALTIES, DEFAULT_PENALTY, CalibConfig, History
from streamer.calib.per_expiry import fit_slices
from streamer.calib.result import Failure, FitResult, Fitted, SliceFit, accepted, failed
from streamer.calib.surface import fit_surface
from streamer.instruments import MS_PER_YEAR
from streamer.models.base import FloatArray, Model

__all__ = ["CalibConfig", "Calibrator", "FitResult", "SliceFit"]

FIT_ERRORS = (FloatingPointError, ValueError, np.linalg.LinAlgError, ZeroDivisionError)


class Calibrator:
    """Keeps one model calibrated on one underlying's successive snapshots."""

    def __init__(self, model: Model, config: CalibConfig | None = None) -> None:
        self.model = model
        self.config = config or CalibConfig()
        lam = self.config.penalty
        penalty = DEFAULT_PENALTIES.get(model.name, DEFAULT_PENALTY) if lam is None else lam
        self.history = History(penalty=penalty, config=self.config)

    @property
    def penalty(self) -> float:
        """Lambda of the change penalty (before it fades with the gap since the last fit)."""
        return self.history.penalty

    @property
    def last_good(self) -> FitResult | None:
        """The last accepted fit (the warm start and the prior of the penalty)."""
        return self.history.last_good

    @last_good.setter
    def last_good(self, fit: FitResult | None) -> None:
        self.history.last_good = fit

    def fit(self, snapshot: ChainSnapshot) -> FitResult:
        """Calibrate to ``snapshot``; returns the accepted fit or the degraded last good one."""
        t0 = time.perf_counter()
        ts_ms = snapshot.ts_ms
        n_min = len(self.model.bounds(1)[0]) + 1 if self.model.per_expiry else 3
        prep = prepare(snapshot, self.config.filters, n_min)
        if prep.data.n_slices == 0:
            why = ", ".join(f"{k} {v}" for k, v in prep.drops.most_common()) or "none quoted"
            return self._degraded(ts_ms, prep, t0, Failure(f"no usable quotes ({why})"))
        strategy = fit_slices if self.model.per_expiry else fit_surface
        try:
            outcome = strategy(self.model, self.history, ts_ms, prep)
        except FIT_ERRORS as exc:
            return self._degraded(ts_ms, prep, t0, Failure(f"fit failed: {exc}"))
        if isinstance(outcome, Failure):
            return self._degraded(ts_ms, prep, t0, outcome)
        return self._accept(ts_ms, prep, t0, outcome)

    def _accept(self, ts_ms: int, prep: Prepared, t0: float, fit: Fitted) -> FitResult:
        result = accepted(self.model.name, ts_ms, prep, t0, fit)
        self.history.last_good = result
        return result

    def _degraded(self, ts_ms: int, prep: Prepared, t0: float, why: Failure) -> FitResult:
        """The last good fit re-stamped ``degraded`` (or a failure when there is none)."""
        elapsed = (time.perf_counter() - t0) * 1e3
        last = self.history.last_good
        if last is None:
            base = failed(self.model.name, ts_ms, why.message, prep, t0, why.nfev, why.violations)
            return replace(base, elapsed_ms=elapsed)
        slices, x = _restamped(last, ts_ms, prep)
        return replace(
            last,
            ts_ms=ts_ms,
            success=False,
            status="degraded",
            message=why.message,
            slices=slices,
            x=x,
            elapsed_ms=elapsed,
            nfev=why.nfev,
            violations=tuple(why.violations),
            drops=prep.drops,
        )


def _restamped(
    last: FitResult, ts_ms: int, prep: Prepared
) -> tuple[tuple[SliceFit, ...], tuple[FloatArray, ...]]:
    """The last good fit's slices at ``ts_ms``: each expiry's T from now, its forward from
    the current quotes where they have one; expiries past settlement left out (a per-expiry
    model's parameter vectors with them)."""
    data = prep.data
    forward = dict(zip(data.slice_expiry, data.slice_forward.tolist(), strict=True))
    keep = [(s.expiry_ms - ts_ms) > 0 for s in last.slices]
    slices = tuple(
        replace(
            s,
            T=(s.expiry_ms - ts_ms) / MS_PER_YEAR,
            forward=forward.get(s.expiry, s.forward),
        )
        for s, k in zip(last.slices, keep, strict=True)
        if k
    )
    if len(last.x) == len(last.slices):  # per-expiry: one vector per slice
        x = tuple(v for v, k in zip(last.x, keep, strict=True) if k)
    else:
        x = last.x
    return slices, x
