"""The incremental calibrator: warm start, change penalty, regime shifts, arbitrage gate.

One ``Calibrator`` per (underlying, model). ``fit(snapshot)``:

1. ``prepare`` filters the quotes and builds IV targets and weights (``streamer.calib.data``).
2. Warm fit: start from the last accepted fit, with the parameter-change penalty rows
   ``sqrt(lambda) (theta - theta_prev) / s`` (DESIGN section 5). Slices (expiries) the last fit
   did not have start cold and carry no penalty.
3. Regime shift: when the forward moved beyond ``regime_forward_move``, an expiry rolled in or
   out (surface models), the warm fit's weighted RMS error jumped beyond
   ``regime_error_factor`` times the previous one, its in-band share fell by
   ``regime_band_drop``, or the last fit is older than ``stale_gap_s``, penalty-free fits run
   too (from the warm result and from the cold multi-start guesses), and the better data fit
   is kept (it must beat the warm one by ``cold_margin``); the result is flagged
   ``regime_shift``. The penalty weight fades as ``horizon / dt`` for gaps beyond
   ``penalty_horizon_s``.
4. Arbitrage gate: every slice's own conditions (the model's ``arbitrage``) and calendar
   monotonicity of total variance across slices on a grid. A per-expiry model's bad slice is
   replaced by its last accepted parameters when those pass, else left out of the surface; a
   surface model with a violation keeps the last good fit. A failed or non-finite fit never
   replaces the last good one: the result is then the last good fit with ``status="degraded"``.

Per-expiry models fit all slices together as independent blocks of one Levenberg-Marquardt
run: compiled (``streamer.calib.kernel``) for models with a scalar row kernel (SVI, SABR,
eSSVI), else ``streamer.calib.lm`` with one vectorised model evaluation per iteration.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from streamer.book.snapshot import ChainSnapshot
from streamer.calib import kernel
from streamer.calib.constraints import hinge_grids, hinge_rows, pair_grids
from streamer.calib.data import FilterConfig, Prepared, in_band, prepare
from streamer.calib.lm import Evaluate, LMProblem, LMResult, Loss, solve
from streamer.calib.repair import calendar_grid, check_grid, repair_slice
from streamer.calib.repair import total_variance as slice_total_variance
from streamer.models.base import (
    KERNEL_NONE,
    FitData,
    FloatArray,
    IntArray,
    Model,
    ParamView,
    Violation,
)

DEFAULT_PENALTY = 10.0
EXACT_CALENDAR_TOL = 1e-9  # relative: the exact tests' margin is (w_j - w_{j-1}) / w_{j-1}
# lambda per model, tuned on noisy re-quotes of one surface (tests/test_calib.py): the warm fit's
# parameter jitter falls well below 1/5 of the cold fit's while in_band stays within 2 points
DEFAULT_PENALTIES = {
    "svi": 1.0,
    "ssvi": 5.0,
    "ssvi-rho": 5.0,
    "essvi": 20.0,
    "sabr": 10.0,
    "heston": 20.0,
    "bates": 5.0,
}


@dataclass(frozen=True)
class CalibConfig:
    """How one model is fitted (per model in the config's ``[models]`` table)."""

    objective: Literal["band", "mid"] = "mid"  # band: a dead zone inside the bid-ask band
    band_fraction: float = 0.9  # dead zone half-width, as a share of the half-spread
    kappa: float = 0.2  # pull to the mid inside the band
    loss: Loss = "soft_l1"
    f_scale: float = 1.0  # residuals are in half-spreads: beyond ~1 the loss turns robust
    penalty: float | None = None  # lambda of the change penalty (0 = off; None = per model)
    max_iter_warm: int = 15
    max_iter_cold: int = 100
    regime_error_factor: float = 2.5
    regime_error_floor: float = 1.0  # weighted RMS (in half-spreads) below which all is fine
    regime_band_drop: float = 0.1  # or the warm fit's in-band share fell this much
    regime_forward_move: float = 0.03
    # the penalty assumes parameters drift like a random walk: over a gap of dt seconds since
    # the last accepted fit its weight is lambda * min(1, horizon / dt); gaps beyond
    # stale_gap_s (e.g. a reconnect after hours) also run a cold fit, as a regime shift
    penalty_horizon_s: float = 60.0
    stale_gap_s: float = 600.0
    cold_margin: float = 0.9
    calendar_tol: float = 1e-6  # total variance may fall by at most this (rounding)
    constraints_in_fit: bool = True  # no-arbitrage hinge rows inside the LM (per-expiry)
    filters: FilterConfig = field(default_factory=FilterConfig)


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


class Calibrator:
    """Keeps one model calibrated on one underlying's successive snapshots."""

    def __init__(self, model: Model, config: CalibConfig | None = None) -> None:
        self.model = model
        self.config = config or CalibConfig()
        lam = self.config.penalty
        self.penalty = DEFAULT_PENALTIES.get(model.name, DEFAULT_PENALTY) if lam is None else lam
        self.last_good: FitResult | None = None
        self._prev_wrms: dict[str, float] = {}  # per slice (per-expiry) or "" (surface)
        self._prev_band: dict[str, float] = {}  # in-band share of the last accepted fit

    # ------------------------------------------------------------------ public
    def fit(self, snapshot: ChainSnapshot) -> FitResult:
        """Calibrate to ``snapshot``; returns the accepted fit or the degraded last good one."""
        t0 = time.perf_counter()
        n_min = len(self.model.bounds(1)[0]) + 1 if self.model.per_expiry else 3
        prepared = prepare(snapshot, self.config.filters, n_min)
        data = prepared.data
        if data.n_slices == 0:
            return self._degraded(snapshot.ts_ms, "no usable quotes", prepared, t0)
        try:
            if self.model.per_expiry:
                result = self._fit_slices(snapshot.ts_ms, prepared, t0)
            else:
                result = self._fit_surface(snapshot.ts_ms, prepared, t0)
        except (FloatingPointError, ValueError, np.linalg.LinAlgError, ZeroDivisionError) as exc:
            return self._degraded(snapshot.ts_ms, f"fit failed: {exc}", prepared, t0)
        if result.success:
            self.last_good = result
            return result
        return self._degraded(snapshot.ts_ms, result.message, prepared, t0, failed=result)

    def _penalty_now(self, ts_ms: int) -> float:
        """Lambda for a fit at ``ts_ms``: full within the horizon, fading beyond it."""
        last = self.last_good
        if last is None:
            return self.penalty
        dt = max((ts_ms - last.ts_ms) / 1000.0, 0.0)
        horizon = self.config.penalty_horizon_s
        return self.penalty * (1.0 if dt <= horizon else horizon / dt)

    def _gap_shift(self, ts_ms: int) -> bool:
        last = self.last_good
        return last is not None and (ts_ms - last.ts_ms) / 1000.0 > self.config.stale_gap_s

    # ------------------------------------------------------------- per expiry
    def _fit_slices(self, ts_ms: int, prep: Prepared, t0: float) -> FitResult:
        model, cfg, data = self.model, self.config, prep.data
        S = data.n_slices
        lo, hi = model.bounds(1)
        p = len(lo)
        starts = _starts(data.slice_idx, S)
        lower, upper = np.tile(lo, (S, 1)), np.tile(hi, (S, 1))
        prev = _prev_slices(self.last_good)
        prior = np.zeros((S, p))
        pen_w = np.zeros((S, p))
        has_prior = np.zeros(S, dtype=np.bool_)
        fwd_jump = np.zeros(S, dtype=np.bool_)
        for j, e in enumerate(data.slice_expiry):
            if e in prev:
                x_prev, f_prev = prev[e]
                prior[j] = x_prev
                has_prior[j] = True
                pen_w[j] = math.sqrt(self._penalty_now(ts_ms)) / model.scale(
                    1, data.slice_T[j : j + 1]
                )
                fwd_jump[j] = abs(data.slice_forward[j] / f_prev - 1.0) > cfg.regime_forward_move
        run = self._slice_runner(data, starts, lower, upper)
        nfev = 0
        # cold candidates for slices without a prior (and regime shifts, below)
        guess_cache: dict[int, list[FloatArray]] = {}

        def guess(j: int) -> list[FloatArray]:
            if j not in guess_cache:
                guess_cache[j] = model.initial_guesses(data.slice(j))
            return guess_cache[j]

        def cold(mask: npt.NDArray[np.bool_], free: FloatArray | None = None) -> LMResult:
            """Penalty-free fits of the masked slices from the multi-start guesses and, when
            given, from ``free`` (the warm result: the cheap answer to a gradual shift)."""
            guesses = [
                ([free[j]] if free is not None and has_prior[j] else []) + guess(j)
                if mask[j]
                else [prior[j]]
                for j in range(S)
            ]
            n_g = max(len(guesses[j]) for j in range(S))
            best: LMResult | None = None
            for g in range(n_g):
                x0 = np.array([guesses[j][min(g, len(guesses[j]) - 1)] for j in range(S)])
                x0 = np.where(mask[:, None], x0, prior)
                res = run(x0, None, None, cfg.max_iter_cold, mask)
                best = res if best is None else _merge_best(best, res, starts, data)
            assert best is not None
            return best

        warm_used = bool(has_prior.any())
        if warm_used:
            x0 = np.array([prior[j] if has_prior[j] else guess(j)[0] for j in range(S)])
            res = run(x0, prior, pen_w, cfg.max_iter_warm, None)
            nfev += res.nfev
            x, iv, data_cost, pen = res.x, res.iv, res.data_cost, res.penalty
            wrms = _block_wrms(iv, data, starts)
            # the in-band share over all slices (one slice's share is too noisy to judge)
            band_all = float(np.mean(in_band(iv, data.iv_bid, data.iv_ask)))
            slipped = band_all < self._prev_band.get("", -1.0) - cfg.regime_band_drop
            err_jump = np.array(
                [
                    has_prior[j]
                    and (
                        slipped
                        or (
                            wrms[j] > cfg.regime_error_floor
                            and wrms[j] > cfg.regime_error_factor * self._prev_wrms.get(e, math.inf)
                        )
                    )
                    for j, e in enumerate(data.slice_expiry)
                ],
                dtype=np.bool_,
            )
            shift = (fwd_jump | err_jump | self._gap_shift(ts_ms)) & has_prior
            need_cold = shift | ~has_prior
        else:
            x = np.zeros((S, p))
            iv = np.zeros(data.n_quotes)
            data_cost = np.full(S, np.inf)
            pen = np.zeros(S)
            shift = np.zeros(S, dtype=np.bool_)
            need_cold = np.ones(S, dtype=np.bool_)
        regime = bool(shift.any())
        if need_cold.any():
            c = cold(need_cold, x if warm_used else None)
            nfev += c.nfev
            take = need_cold & (
                ~has_prior | (c.data_cost < cfg.cold_margin * data_cost) | ~np.isfinite(data_cost)
            )
            pt = take[data.slice_idx]
            x = np.where(take[:, None], c.x, x)
            iv = np.where(pt, c.iv, iv)
            data_cost = np.where(take, c.data_cost, data_cost)
            pen = np.where(take, 0.0, pen)
        # arbitrage gate: all slices' own checks and calendar gaps at once; only when one
        # fails, the slice-by-slice gate (repair, last accepted parameters, or drop)
        violations: list[Violation] = []
        keep = np.isfinite(data_cost) & np.all(np.isfinite(x), axis=1)
        own = model.arbitrage_slices(np.where(keep[:, None], x, lo), data.slice_T)
        k_cal = pair_grids(data, 61)
        gaps = _calendar_gaps(model, x, data.slice_T, k_cal) if keep.all() else None
        clean = gaps is not None and not any(own) and bool(np.all(gaps <= cfg.calendar_tol))
        if clean and model.exact_calendar and S > 1:
            clean = bool(np.all(model.calendar_shortfall(x[:-1], x[1:]) <= EXACT_CALENDAR_TOL))
        if not clean:
            self._gate_slices(x, keep, own, k_cal, data, prior, pen_w, has_prior, prev, violations)
            if not keep.any():
                return self._failed(
                    ts_ms,
                    "no slice passed the fit and arbitrage checks",
                    prep,
                    t0,
                    nfev,
                    violations,
                )
            iv = _refresh_iv(model, x, data)
        wrms = _block_wrms(iv, data, starts)
        for j, e in enumerate(data.slice_expiry):
            if keep[j]:
                self._prev_wrms[e] = float(wrms[j])
        pts = keep[data.slice_idx]
        self._prev_band[""] = _band_ref(
            self._prev_band.get(""),
            float(np.mean(in_band(iv[pts], data.iv_bid[pts], data.iv_ask[pts]))),
        )
        atm = model.implied_vol_slices(x, data.slice_T)
        params = [model.view(x[j], 1).slices[0] for j in range(S)]
        slices = _slice_fits(data, prep, iv, atm, params, keep)
        xs = [x[j].copy() for j in range(S) if keep[j]]
        return self._result(
            ts_ms,
            prep,
            t0,
            iv,
            pts,
            tuple(slices),
            tuple(xs),
            {},
            nfev,
            float(np.sum(pen[keep])),
            warm_used,
            regime,
            violations,
        )

    def _gate_slices(
        self,
        x: FloatArray,
        keep: npt.NDArray[np.bool_],
        own: list[list[Violation]],
        k_cal: FloatArray,
        data: FitData,
        prior: FloatArray,
        pen_w: FloatArray,
        has_prior: npt.NDArray[np.bool_],
        prev: dict[str, tuple[FloatArray, float]],
        violations: list[Violation],
    ) -> None:
        """The arbitrage gate slice by slice (updates ``x``, ``keep``, ``violations``).

        Shortest slice first: each must pass its own checks and lie above the previous
        accepted slice (calendar, on ``k_cal[j]``); a failing slice is re-fitted with the
        constraints enforced, else falls back to its last accepted parameters, else drops.
        """
        model, cfg = self.model, self.config
        k_bf = check_grid(data)
        below: int | None = None  # the last accepted slice
        for j in range(data.n_slices):
            if not keep[j]:
                continue
            Tj = float(data.slice_T[j])
            found = list(own[j])
            w_below: FloatArray | None = None
            k_grid = k_cal[j] if j else np.zeros(1)
            if below is not None:
                Tb = float(data.slice_T[below])
                if model.exact_calendar:  # the repair's grid reaches every k
                    k_grid = np.sort(np.concatenate([k_grid, model.calendar_grid(x[below], 61)]))
                w_below = slice_total_variance(model, x[below], k_grid, Tb)
            w = slice_total_variance(model, x[j], k_grid, Tj)
            if w_below is not None and np.max(w_below - w) > cfg.calendar_tol:
                found.append(
                    Violation(
                        "calendar", j, float(np.max(w_below - w)), "total variance falls with T"
                    )
                )
            elif below is not None and self._crosses(x[below], x[j]):
                found.append(Violation("calendar", j, 1.0, "slices cross beyond the quotes"))
            if found:
                violations.extend(replace(v, slice=j) for v in found)
                fixed = repair_slice(
                    model,
                    x[j],
                    data.slice(j),
                    self._slice_residuals(j, data, prior, pen_w, has_prior),
                    w_below,
                    k_bf,
                    k_grid,
                    cfg.calendar_tol,
                )
                if fixed is not None and below is not None and self._crosses(x[below], fixed):
                    fixed = None
                e = data.slice_expiry[j]
                if fixed is None and e in prev:
                    cand = prev[e][0]
                    wc = slice_total_variance(model, cand, k_grid, Tj)
                    ok_prev = (
                        not model.arbitrage(cand, data.slice_T[j : j + 1])
                        and (w_below is None or np.max(w_below - wc) <= cfg.calendar_tol)
                        and (below is None or not self._crosses(x[below], cand))
                    )
                    fixed = cand if ok_prev else None
                if (
                    fixed is None
                    and model.exact_calendar
                    and below is not None
                    and all(v.check == "calendar" for v in found)
                ):
                    fixed = model.calendar_repair(x[below], x[j])
                    if self._crosses(x[below], fixed) or model.arbitrage(
                        fixed, data.slice_T[j : j + 1]
                    ):
                        fixed = None
                if fixed is None:
                    keep[j] = False
                    continue
                x[j] = fixed
            below = j

    def _crosses(self, x_below: FloatArray, x: FloatArray) -> bool:
        """The exact whole-line calendar test between two slices (``exact_calendar``
        models; others are checked on the grid only)."""
        if not self.model.exact_calendar:
            return False
        gap = self.model.calendar_shortfall(x_below[None, :], x[None, :])
        return bool(gap[0] > EXACT_CALENDAR_TOL)

    def _slice_runner(
        self, data: FitData, starts: IntArray, lower: FloatArray, upper: FloatArray
    ) -> Callable[
        [FloatArray, FloatArray | None, FloatArray | None, int, npt.NDArray[np.bool_] | None],
        LMResult,
    ]:
        """``run(x0, prior, pen_w, max_iter, active)``: the block LM over all slices, compiled
        (``streamer.calib.kernel``) for models with a row kernel, else ``lm.solve`` (which
        fits every slice: ``active`` only saves work)."""
        model, cfg = self.model, self.config
        hinges_on = cfg.constraints_in_fit
        if model.kernel_kind == KERNEL_NONE:
            evaluate = _slice_evaluator(model, data)
            hinges = hinge_rows(model, data) if hinges_on else None

            def run_numpy(
                x0: FloatArray,
                prior: FloatArray | None,
                pen_w: FloatArray | None,
                max_iter: int,
                active: npt.NDArray[np.bool_] | None,
            ) -> LMResult:
                problem = self._problem(evaluate, data, starts, lower, upper, prior, pen_w, hinges)
                return solve(problem, x0, max_iter=max_iter)

            return run_numpy
        S, p = lower.shape
        inner, outer, kcal = hinge_grids(data)
        band = (
            cfg.band_fraction * 0.5 * (data.iv_ask - data.iv_bid)
            if cfg.objective == "band"
            else np.zeros(0)
        )
        zeros = np.zeros((S, p))

        def run_kernel(
            x0: FloatArray,
            prior: FloatArray | None,
            pen_w: FloatArray | None,
            max_iter: int,
            active: npt.NDArray[np.bool_] | None,
        ) -> LMResult:
            X, iv, cost, pen, conv, nfev, iters = kernel.fit_slices(
                model.kernel_kind,
                model.kernel_arg,
                np.ascontiguousarray(x0, dtype=np.float64),
                np.ones(S, dtype=np.bool_) if active is None else active,
                data.k,
                data.T,
                data.iv,
                data.weight,
                band,
                cfg.kappa,
                kernel.LOSS_CODES[cfg.loss],
                cfg.f_scale,
                starts,
                lower,
                upper,
                zeros if prior is None else prior,
                zeros if pen_w is None else pen_w,
                hinges_on,
                inner,
                outer,
                kcal,
                data.slice_T,
                max_iter,
                1e-5,
                1e-9,
            )
            return LMResult(X, iv, cost, pen, conv, int(nfev), int(iters))

        return run_kernel

    # ---------------------------------------------------------------- surface
    def _fit_surface(self, ts_ms: int, prep: Prepared, t0: float) -> FitResult:
        model, cfg, data = self.model, self.config, prep.data
        S = data.n_slices
        lo, hi = model.bounds(S)
        lower, upper = lo[None, :], hi[None, :]
        starts = np.zeros(1, dtype=np.int64)
        evaluate = _surface_evaluator(model, data)
        cache: list[list[FloatArray]] = []

        def guesses() -> list[FloatArray]:
            if not cache:
                cache.append(model.initial_guesses(data))
            return cache[0]

        last = self.last_good
        nfev = 0
        regime = False
        warm_used = False
        best: LMResult | None = None
        if last is not None and last.x:
            warm_used = True
            x0, prior_mask = _warm_vector(model, last, data, guesses)
            pen_w = np.where(
                prior_mask, math.sqrt(self._penalty_now(ts_ms)) / model.scale(S, data.slice_T), 0.0
            )[None, :]
            prior = x0[None, :].copy()
            best = solve(
                self._problem(evaluate, data, starts, lower, upper, prior, pen_w),
                x0[None, :],
                max_iter=cfg.max_iter_warm,
            )
            nfev += best.nfev
            wrms = float(_block_wrms(best.iv, data, starts)[0])
            prev_f = {s.expiry: s.forward for s in last.slices}
            rolled = set(prev_f) != set(data.slice_expiry)
            moved = any(
                abs(f / prev_f[e] - 1.0) > cfg.regime_forward_move
                for e, f in zip(data.slice_expiry, data.slice_forward, strict=True)
                if e in prev_f
            )
            jumped = wrms > cfg.regime_error_floor and wrms > cfg.regime_error_factor * (
                self._prev_wrms.get("", math.inf)
            )
            band = float(_block_band(best.iv, data, starts)[0])
            slipped = band < self._prev_band.get("", -1.0) - cfg.regime_band_drop
            regime = rolled or moved or jumped or slipped or self._gap_shift(ts_ms)
        if best is None or regime:
            cold_best: LMResult | None = None
            starts_x = ([best.x[0]] if best is not None else []) + list(guesses())
            for g in starts_x:
                r = solve(
                    self._problem(evaluate, data, starts, lower, upper),
                    np.asarray(g, dtype=np.float64)[None, :],
                    max_iter=cfg.max_iter_cold,
                )
                nfev += r.nfev
                if cold_best is None or r.data_cost[0] < cold_best.data_cost[0]:
                    cold_best = r
            assert cold_best is not None
            if (
                best is None
                or cold_best.data_cost[0] < cfg.cold_margin * best.data_cost[0]
                or (not np.isfinite(best.data_cost[0]))
            ):
                best = replace(cold_best, penalty=np.zeros(1))
        x = best.x[0]
        if not (np.isfinite(best.data_cost[0]) and np.all(np.isfinite(x))):
            return self._failed(ts_ms, "non-finite fit", prep, t0, nfev, [])
        violations = list(model.arbitrage(x, data.slice_T))
        self._surface_calendar(x, data, violations)
        pinned = model.safe_bounds(x, lo, hi) if violations else None
        if pinned is not None:
            # re-fit inside a sub-region that is arbitrage-free by construction
            again = solve(
                self._problem(evaluate, data, starts, pinned[0][None, :], pinned[1][None, :]),
                np.clip(x, pinned[0], pinned[1])[None, :],
                max_iter=cfg.max_iter_cold,
            )
            nfev += again.nfev
            x2 = again.x[0]
            found: list[Violation] = list(model.arbitrage(x2, data.slice_T))
            self._surface_calendar(x2, data, found)
            if not found and np.isfinite(again.data_cost[0]):
                x, best = x2, replace(again, penalty=np.zeros(1))
                violations = [replace(v, detail=v.detail + " (re-fitted)") for v in violations]
        iv = best.iv if np.array_equal(best.x[0], x) else _refresh_iv(model, x[None, :], data)
        if any("(re-fitted)" not in v.detail for v in violations):
            return self._failed(
                ts_ms, "static arbitrage: " + violations[0].check, prep, t0, nfev, violations
            )
        self._prev_wrms[""] = float(_block_wrms(iv, data, starts)[0])
        self._prev_band[""] = _band_ref(
            self._prev_band.get(""), float(_block_band(iv, data, starts)[0])
        )
        view = model.view(x, S)
        atm = model.implied_vol(x, np.zeros(S), data.slice_T, np.arange(S, dtype=np.int64))
        slices = _slice_fits(data, prep, iv, atm, view.slices, np.ones(S, dtype=np.bool_))
        return self._result(
            ts_ms,
            prep,
            t0,
            iv,
            np.ones(data.n_quotes, dtype=np.bool_),
            slices,
            (x.copy(),),
            view.surface,
            nfev,
            float(best.penalty[0]),
            warm_used,
            regime,
            violations,
        )

    # ---------------------------------------------------------------- helpers
    def _problem(
        self,
        evaluate: Evaluate,
        data: FitData,
        starts: IntArray,
        lower: FloatArray,
        upper: FloatArray,
        prior: FloatArray | None = None,
        pen_w: FloatArray | None = None,
        extra: Callable[[FloatArray], tuple[FloatArray, FloatArray]] | None = None,
    ) -> LMProblem:
        cfg = self.config
        band = None
        if cfg.objective == "band":
            band = cfg.band_fraction * 0.5 * (data.iv_ask - data.iv_bid)
        return LMProblem(
            evaluate,
            data.iv,
            data.weight,
            starts,
            lower,
            upper,
            prior=prior,
            penalty_weight=pen_w,
            loss=cfg.loss,
            f_scale=cfg.f_scale,
            band=band,
            kappa=cfg.kappa,
            extra=extra,
        )

    def _surface_calendar(self, x: FloatArray, data: FitData, violations: list[Violation]) -> None:
        """Total variance must not fall with T on the quoted range (surface models: a check)."""
        k_grid = calendar_grid(data)
        S, G = data.n_slices, len(k_grid)
        T = np.repeat(data.slice_T, G)
        iv = self.model.implied_vol(
            x, np.tile(k_grid, S), T, np.repeat(np.arange(S, dtype=np.int64), G)
        )
        w = (iv * iv * T).reshape(S, G)
        for j in range(1, S):
            gap = float(np.max(w[j - 1] - w[j]))
            if gap > self.config.calendar_tol:
                violations.append(Violation("calendar", j, gap, "total variance falls with T"))

    def _slice_residuals(
        self,
        j: int,
        data: FitData,
        prior: FloatArray,
        pen_w: FloatArray,
        has_prior: npt.NDArray[np.bool_],
    ) -> Callable[[FloatArray], FloatArray]:
        """Slice ``j``'s weighted residuals (band objective) plus its change-penalty rows."""
        cfg, model, d = self.config, self.model, data.slice(j)
        band = cfg.band_fraction * 0.5 * (d.iv_ask - d.iv_bid) if cfg.objective == "band" else None
        z = np.zeros(d.n_quotes, dtype=np.int64)

        def residuals(xj: FloatArray) -> FloatArray:
            e = model.implied_vol(xj, d.k, d.T, z) - d.iv
            if band is not None:
                e = cfg.kappa * e + (e - np.clip(e, -band, band))
            r = d.weight * e
            if has_prior[j]:
                r = np.concatenate([r, pen_w[j] * (xj - prior[j])])
            return np.asarray(np.where(np.isfinite(r), r, 1e3))

        return residuals

    def _result(
        self,
        ts_ms: int,
        prep: Prepared,
        t0: float,
        iv: FloatArray,
        pts: npt.NDArray[np.bool_],
        slices: tuple[SliceFit, ...],
        xs: tuple[FloatArray, ...],
        surface_params: dict[str, float],
        nfev: int,
        penalty: float,
        warm: bool,
        regime: bool,
        violations: list[Violation],
    ) -> FitResult:
        data = prep.data
        resid = iv[pts] - data.iv[pts]
        band = in_band(iv[pts], data.iv_bid[pts], data.iv_ask[pts])
        return FitResult(
            model=self.model.name,
            ts_ms=ts_ms,
            success=True,
            status="ok",
            message="ok" if not violations else f"{len(violations)} arbitrage finding(s) handled",
            params=surface_params,
            slices=slices,
            x=xs,
            nfev=nfev,
            elapsed_ms=(time.perf_counter() - t0) * 1e3,
            rmse_iv=float(np.sqrt(np.mean(resid * resid))) if resid.size else math.nan,
            in_band=float(np.mean(band)) if band.size else math.nan,
            n_quotes=int(pts.sum()),
            penalty=penalty,
            warm=warm,
            regime_shift=regime,
            violations=tuple(violations),
            drops=prep.drops,
            fitted_iv=iv,
            prepared=prep,
        )

    def _failed(
        self,
        ts_ms: int,
        message: str,
        prep: Prepared,
        t0: float,
        nfev: int,
        violations: list[Violation],
    ) -> FitResult:
        return FitResult(
            model=self.model.name,
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
            violations=tuple(violations),
            drops=prep.drops,
            prepared=prep,
        )

    def _degraded(
        self,
        ts_ms: int,
        message: str,
        prep: Prepared,
        t0: float,
        failed: FitResult | None = None,
    ) -> FitResult:
        """The last good fit re-stamped ``degraded`` (or a failure when there is none)."""
        elapsed = (time.perf_counter() - t0) * 1e3
        last = self.last_good
        if last is None:
            base = failed or self._failed(ts_ms, message, prep, t0, 0, [])
            return replace(base, elapsed_ms=elapsed, message=message)
        return replace(
            last,
            ts_ms=ts_ms,
            success=False,
            status="degraded",
            message=message,
            elapsed_ms=elapsed,
            nfev=failed.nfev if failed else 0,
            violations=failed.violations if failed else (),
            drops=prep.drops,
        )


# ------------------------------------------------------------------ module helpers
def _starts(slice_idx: IntArray, S: int) -> IntArray:
    return np.searchsorted(slice_idx, np.arange(S)).astype(np.int64)


def _prev_slices(last: FitResult | None) -> dict[str, tuple[FloatArray, float]]:
    if last is None or not last.slices or len(last.x) != len(last.slices):
        return {}
    return {s.expiry: (x, s.forward) for s, x in zip(last.slices, last.x, strict=True)}


def _block_wrms(iv: FloatArray, data: FitData, starts: IntArray) -> FloatArray:
    r = data.weight * (iv - data.iv)
    r = np.where(np.isfinite(r), r, 1e6)
    counts = np.diff(np.append(starts, len(r)))
    sums = np.add.reduceat(r * r, starts) if len(starts) > 1 else np.array([np.sum(r * r)])
    return np.asarray(np.sqrt(sums / np.maximum(counts, 1)))


def _slice_fits(
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
    m = np.maximum(n, 1)
    return tuple(
        SliceFit(
            expiry=data.slice_expiry[j],
            expiry_ms=int(prep.expiry_ms[j]),
            T=float(data.slice_T[j]),
            forward=float(data.slice_forward[j]),
            params=params[j],
            atm_iv=float(atm[j]),
            rmse_iv=float(np.sqrt(sq[j] / m[j])),
            in_band=float(inside[j] / m[j]),
            n_quotes=int(n[j]),
        )
        for j in range(S)
        if keep[j]
    )


BAND_REF_DECAY = 0.01  # per fit


def _band_ref(ref: float | None, band: float) -> float:
    """The in-band reference a warm fit is compared with: a running peak that decays by
    ``BAND_REF_DECAY`` per fit, so a slow slide (a fit lagging a trending market) is caught
    as surely as a sudden drop."""
    return band if ref is None else max(band, ref - BAND_REF_DECAY)


def _block_band(iv: FloatArray, data: FitData, starts: IntArray) -> FloatArray:
    """Per block: share of fitted IVs inside the bid-ask band."""
    inside = in_band(iv, data.iv_bid, data.iv_ask)
    counts = np.diff(np.append(starts, len(iv)))
    sums = np.add.reduceat(inside, starts) if len(starts) > 1 else np.array([inside.sum()])
    return np.asarray(sums / np.maximum(counts, 1))


def _merge_best(a: LMResult, b: LMResult, starts: IntArray, data: FitData) -> LMResult:
    take = b.data_cost < a.data_cost
    pt = take[data.slice_idx]
    return LMResult(
        x=np.where(take[:, None], b.x, a.x),
        iv=np.where(pt, b.iv, a.iv),
        data_cost=np.where(take, b.data_cost, a.data_cost),
        penalty=np.where(take, b.penalty, a.penalty),
        converged=np.where(take, b.converged, a.converged),
        nfev=a.nfev + b.nfev,
        iterations=max(a.iterations, b.iterations),
    )


def _slice_evaluator(model: Model, data: FitData):  # type: ignore[no-untyped-def]
    """``X (S, p) -> (iv, local jacobian)`` for a per-expiry model, all slices at once."""
    k, T, idx = data.k, data.T, data.slice_idx
    block = getattr(model, "block_jacobian", None)

    def evaluate(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        if block is not None:
            iv, jac = block(X[idx], k, T)
            return np.asarray(iv), np.asarray(jac)
        iv = np.empty(len(k))
        jac = np.empty((len(k), X.shape[1]))
        for j in range(X.shape[0]):
            m = idx == j
            z = np.zeros(int(m.sum()), dtype=np.int64)
            iv[m] = model.implied_vol(X[j], k[m], T[m], z)
            jj = model.jacobian(X[j], k[m], T[m], z)
            jac[m] = jj if jj is not None else _fd_jac(model, X[j], k[m], T[m], z, iv[m])
        return iv, jac

    return evaluate


def _surface_evaluator(model: Model, data: FitData):  # type: ignore[no-untyped-def]
    k, T, idx = data.k, data.T, data.slice_idx

    def evaluate(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        x = X[0]
        iv = np.asarray(model.implied_vol(x, k, T, idx), dtype=np.float64)
        jac = model.jacobian(x, k, T, idx)
        if jac is None:
            jac = _fd_jac(model, x, k, T, idx, iv)
        return iv, np.asarray(jac, dtype=np.float64)

    return evaluate


def _fd_jac(
    model: Model, x: FloatArray, k: FloatArray, T: FloatArray, idx: IntArray, iv: FloatArray
) -> FloatArray:
    """Forward differences, step scaled to each parameter."""
    _, hi = model.bounds(int(idx.max()) + 1 if idx.size else 1)
    jac = np.empty((len(k), len(x)))
    for i in range(len(x)):
        h = 1e-6 * max(abs(float(x[i])), 1e-3)
        xp = x.copy()
        if xp[i] + h > hi[i]:
            h = -h
        xp[i] += h
        jac[:, i] = (model.implied_vol(xp, k, T, idx) - iv) / h
    return jac


def _calendar_gaps(
    model: Model, X: FloatArray, slice_T: FloatArray, k_cal: FloatArray
) -> FloatArray | None:
    """Per slice ``j >= 1``: the largest fall of total variance from slice ``j-1`` to ``j``
    on ``k_cal[j]`` (entry 0: -inf), for all slices at once; None for a model without a
    row-wise evaluation."""
    S, G = k_cal.shape
    if S < 2:
        return np.full(S, -np.inf)
    k = k_cal[1:].ravel()
    T_j = np.repeat(slice_T[1:], G)
    T_prev = np.repeat(slice_T[:-1], G)
    if model.kernel_kind != KERNEL_NONE:
        X = np.ascontiguousarray(X, dtype=np.float64)
        idx = np.repeat(np.arange(1, S), G)
        iv_j = kernel.rows_iv(model.kernel_kind, model.kernel_arg, X, idx, k, T_j)
        iv_p = kernel.rows_iv(model.kernel_kind, model.kernel_arg, X, idx - 1, k, T_prev)
    else:
        iv_rows = getattr(model, "iv_rows", None)
        if iv_rows is None:
            return None
        iv_j = iv_rows(np.repeat(X[1:], G, axis=0), k, T_j)
        iv_p = iv_rows(np.repeat(X[:-1], G, axis=0), k, T_prev)
    gap = (iv_p * iv_p * T_prev - iv_j * iv_j * T_j).reshape(S - 1, G)
    return np.concatenate([[-np.inf], np.max(gap, axis=1)])


def _refresh_iv(model: Model, x: FloatArray, data: FitData) -> FloatArray:
    if model.per_expiry:
        evaluate = _slice_evaluator(model, data)
        return np.asarray(evaluate(x)[0], dtype=np.float64)
    return np.asarray(model.implied_vol(x[0], data.k, data.T, data.slice_idx), dtype=np.float64)


def _warm_vector(
    model: Model, last: FitResult, data: FitData, cold_guesses: Callable[[], list[FloatArray]]
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Warm start for a surface model on the current slices: the last fit's parameters, by
    expiry; new expiries take the (lazily computed) cold guess. Also which entries have a
    previous value."""
    S = data.n_slices
    last_slices = {s.expiry: s.params for s in last.slices}
    slices: list[dict[str, float]] = []
    for j, e in enumerate(data.slice_expiry):
        if e in last_slices:
            slices.append(dict(last_slices[e]))
        else:
            slices.append(dict(model.view(cold_guesses()[0], S).slices[j]))
    view = ParamView(surface=dict(last.params), slices=slices)
    x0 = model.from_view(view, S)
    mask = np.ones(len(x0), dtype=np.bool_)
    for i, name in enumerate(model.param_names(S)):
        if name.endswith("]"):
            j = int(name[name.index("[") + 1 : -1])
            mask[i] = data.slice_expiry[j] in last_slices
    lo, hi = model.bounds(S)
    return np.clip(x0, lo, hi), mask
