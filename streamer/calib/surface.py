"""The surface strategy (SSVI, ssvi-rho, Heston, Bates, ...): one parameter vector, one LM block.

``fit_surface(model, history, ts_ms, prepared)`` in named steps:

1. ``warm`` (start, solve): from the last accepted fit (its parameters by expiry: a new
   expiry takes the cold guess's), with the change penalty; then the regime tests: an expiry
   rolled in or out, a forward moved beyond ``regime_forward_move``, the error jumped, the
   in-band share slipped, or a long gap.
2. ``cold`` (solve): on a regime shift or without a warm start, penalty-free fits from the warm
   result and, by ``cold_start``: the learned guess (``streamer.calib.learned``; the model's
   hand-made guesses where it has no network), the hand-made guesses, or the global search
   (``streamer.calib.global_opt``, differential evolution or CMA-ES, then LM polish). The
   learned path falls back to the global search when no start gives a finite, converged fit
   (or one within ``global_fallback_wrms``). Kept if it beats the warm fit by ``cold_margin``.
3. ``gate``: the model's own conditions and the calendar check on each pair of expiries'
   common range (``streamer.calib.gate``); a violation is re-fitted inside the model's
   ``safe_bounds`` (a region free of arbitrage by construction) or the fit is not accepted.
4. ``result``: the regime references for the next fit, per-slice statistics, ``Fitted``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from streamer.calib.data import Prepared
from streamer.calib.evaluate import coarse_evaluator, surface_evaluator
from streamer.calib.gate import surface_calendar
from streamer.calib.global_opt import global_search
from streamer.calib.learned import learned_guess
from streamer.calib.lm import FTOL, Evaluate, LMResult, solve
from streamer.calib.options import History
from streamer.calib.result import Failure, FitResult, Fitted, block_band, block_wrms, slice_fits
from streamer.models.base import FitData, FloatArray, Model, ParamView, Violation

REFITTED = " (re-fitted)"
RACE_CAP = 3  # a race's later starts get this many times the iterations of a converged one
RACE_MIN_CAP = 30  # ... and at least this many
CRAWL_NFEV = 30  # a cold run that needed more evaluations crawled along a valley
COARSE_FTOL = 3e-3  # a cold run's coarse phase stops on a step that buys less than this


def fit_surface(model: Model, history: History, ts_ms: int, prep: Prepared) -> Fitted | Failure:
    """One surface calibration: the accepted fit, or why there is none."""
    fit = _SurfaceFit(model, history, ts_ms, prep)
    best = fit.warm()
    if best is None or fit.regime:
        best = fit.cold(best)
    x = best.x[0]
    if not (np.isfinite(best.data_cost[0]) and np.all(np.isfinite(x))):
        return Failure("non-finite fit", fit.nfev)
    best, violations = fit.gate(best)
    if any(REFITTED not in v.detail for v in violations):
        return Failure("static arbitrage: " + violations[0].check, fit.nfev, violations)
    return fit.result(best, violations)


class _SurfaceFit:
    """The working state of one surface fit, step by step."""

    def __init__(self, model: Model, history: History, ts_ms: int, prep: Prepared) -> None:
        self.model, self.history, self.prep, self.ts_ms = model, history, prep, ts_ms
        self.cfg = history.config
        self.data = data = prep.data
        self.S = data.n_slices
        self.lo, self.hi = model.bounds(self.S)
        self.starts = np.zeros(1, dtype=np.int64)
        self.evaluate = surface_evaluator(model, data)
        self.coarse = coarse_evaluator(model, data)
        self.coarse_race = coarse_evaluator(model, data, "coarse_race")
        self.nfev = 0
        self.regime = False
        self.warm_used = False
        self._guesses: list[list[FloatArray]] = []

    def guesses(self) -> list[FloatArray]:
        """The model's cold-start candidates (computed once, when first needed)."""
        if not self._guesses:
            self._guesses.append(self.model.initial_guesses(self.data))
        return self._guesses[0]

    def _solve(
        self,
        x0: FloatArray,
        max_iter: int,
        prior: FloatArray | None = None,
        pen_w: FloatArray | None = None,
        bounds: tuple[FloatArray, FloatArray] | None = None,
        *,
        evaluate: Evaluate | None = None,
        ftol: float = FTOL,
        beat: float = math.inf,
    ) -> LMResult:
        """An LM run from ``x0`` on the fit's prices (or ``evaluate``'s: the coarse ones)."""
        lo, hi = bounds or (self.lo, self.hi)
        problem = self.cfg.problem(
            evaluate or self.evaluate,
            self.data,
            self.starts,
            lo[None, :],
            hi[None, :],
            prior,
            pen_w,
        )
        # penalty-free (cold) fits of a model that asks for it take the secant-augmented LM
        secant = prior is None and bool(getattr(self.model, "secant_lm", False))
        x = np.asarray(x0, dtype=np.float64)[None, :]
        res = solve(problem, x, max_iter=max_iter, ftol=ftol, secant=secant, beat=beat)
        self.nfev += res.nfev
        return res

    def race(self, starts: list[FloatArray]) -> list[LMResult]:
        """Penalty-free LM runs from ``starts`` in turn, each to convergence or, once one
        has converged, to at most ``RACE_CAP`` times its iterations (``RACE_MIN_CAP`` at
        least): a start that needs many more is crawling along a flat valley. On the 56
        shared snapshot chains (Bates, its two rivals then the learned guess) this reached
        the best of nine starts on 55 in a median 77 evaluations; full runs 55 in 85; a cap
        of 2x 53 in 74; 25 iterations each, then only those within 10% of the lowest cost
        carried on, 53 in 71; successive halving after 3 or 8 iterations 34-42 (early costs
        do not rank the basins).

        A model with ``coarse_race`` runs the whole race on its coarse prices
        (``coarse_iv_and_jacobian``, to convergence), then polishes only the lowest run on
        the fit's own prices: the race's one result. On the 56 shared snapshot chains
        (Bates, learned cold fits) this ended within 0.0015 % of the one-phase race's cost on
        every chain (at most 1.0000148x it, on 5 chains lower) in half the CPU time (median
        46 -> 23 ms, the default BTC chain 41.5 -> 20.0).

        Once a run has converged, each later one gives up when its pace cannot bring it below
        the lowest converged cost in the iterations it has left (``solve``'s ``beat``): on the
        56 shared chains and 5 simulated ones the same optima (within 0.1 %) in a median 52
        evaluations instead of 66 (coarse race)."""
        max_iter = self.cfg.max_iter_cold
        runs: list[LMResult] = []
        for g in starts:
            done = [r for r in runs if bool(r.converged[0]) and np.isfinite(r.data_cost[0])]
            cap, beat = max_iter, math.inf
            if done:  # a converged rival: a start needing many more steps is crawling
                cap = min(max_iter, max(RACE_MIN_CAP, RACE_CAP * min(r.iterations for r in done)))
                beat = min(float(r.data_cost[0]) for r in done)
            if self.coarse_race is None:
                runs.append(self._solve_cold(g, cap))
            else:
                runs.append(self._solve(g, cap, evaluate=self.coarse_race, beat=beat))
        if self.coarse_race is None or not runs:
            return runs
        best = min(runs, key=lambda r: float(r.data_cost[0]))
        x0 = best.x[0] if np.all(np.isfinite(best.x[0])) else np.asarray(starts[-1], np.float64)
        polished = self._solve(x0, max_iter)
        # the winner's path: its coarse run, then the polish (``self.nfev`` counts them all)
        nfev, iterations = best.nfev + polished.nfev, best.iterations + polished.iterations
        return [replace(polished, nfev=nfev, iterations=iterations)]

    def _solve_cold(self, x0: FloatArray, max_iter: int) -> LMResult:
        """A penalty-free run in two phases for a model that asks for it (``coarse_cold``;
        ``coarse_iv_and_jacobian``): to ``COARSE_FTOL`` on the coarse prices, then on the
        fit's own from where that ended (each phase at most ``max_iter`` iterations; the
        result counts both). On 20 shared snapshot chains (Heston, learned guess) the fine
        phase then needs a median 3 evaluations instead of 10 from the guess, 27 % less time
        for the same costs (within 1e-5)."""
        if self.coarse is None:
            return self._solve(x0, max_iter)
        first = self._solve(x0, max_iter, evaluate=self.coarse, ftol=COARSE_FTOL)
        x1 = first.x[0] if np.all(np.isfinite(first.x[0])) else np.asarray(x0, dtype=np.float64)
        res = self._solve(x1, max_iter)
        total = res.iterations + first.iterations
        return replace(res, nfev=res.nfev + first.nfev, iterations=total)

    # -- 1. warm start ---------------------------------------------------------------------
    def warm(self) -> LMResult | None:
        """The penalised fit from the last accepted one (None without one); sets ``regime``."""
        last, cfg, data, hist = self.history.last_good, self.cfg, self.data, self.history
        if last is None or not last.x:
            return None
        self.warm_used = True
        x0, prior_mask = warm_vector(self.model, last, data, self.guesses)
        scale = self.model.scale(self.S, data.slice_T)
        pen_w = np.where(prior_mask, math.sqrt(hist.penalty_now(self.ts_ms)) / scale, 0.0)
        best = self._solve(x0, cfg.max_iter_warm, x0[None, :].copy(), pen_w[None, :])
        wrms = float(block_wrms(best.iv, data, self.starts)[0])
        prev_f = {s.expiry: s.forward for s in last.slices}
        rolled = set(prev_f) != set(data.slice_expiry)
        moved = any(
            abs(f / prev_f[e] - 1.0) > cfg.regime_forward_move
            for e, f in zip(data.slice_expiry, data.slice_forward, strict=True)
            if e in prev_f
        )
        band = float(block_band(best.iv, data, self.starts)[0])
        self.regime = (
            rolled
            or moved
            or hist.jumped("", wrms)
            or hist.slipped(band)
            or hist.gap_shift(self.ts_ms)
        )
        return best

    # -- 2. cold starts --------------------------------------------------------------------
    def cold(self, warm: LMResult | None) -> LMResult:
        """Penalty-free fits from the warm result and the ``cold_start`` starts; the best if
        it beats the warm fit by ``cold_margin`` (or there is no usable warm fit)."""
        cfg = self.cfg
        starts = [warm.x[0]] if warm is not None else []
        learned = learned_guess(self.model, self.data) if cfg.cold_start != "guesses" else None
        if cfg.cold_start == "guesses" or (cfg.cold_start == "learned" and learned is None):
            starts.extend(self.guesses())
        runs = [self._solve(g, cfg.max_iter_cold) for g in starts]
        if learned is not None and cfg.cold_start == "learned":
            # the network's guess, and the model's other basins near it (``learned_rivals``)
            rivals = getattr(self.model, "learned_rivals", None)
            runs.extend(self.race([*([] if rivals is None else rivals(learned)), learned]))
        if cfg.cold_start == "learned" and learned is not None and self._doubtful(runs):
            runs.extend(self.race(self.guesses()))  # the hand-made starts before the search
        if cfg.cold_start == "global" or (cfg.cold_start == "learned" and self._doubtful(runs)):
            seeds = [*starts, *([] if learned is None else [learned]), *self.guesses()]
            runs.append(self.global_fit(seeds))
        cold_best = min(runs, key=lambda r: float(r.data_cost[0]))
        cold_best = self.uncurl(cold_best)
        if (
            warm is None
            or cold_best.data_cost[0] < cfg.cold_margin * warm.data_cost[0]
            or (not np.isfinite(warm.data_cost[0]))
        ):
            return replace(cold_best, penalty=np.zeros(1))
        return warm

    def uncurl(self, best: LMResult) -> LMResult:
        """A best cold run that crawled (more than ``CRAWL_NFEV`` evaluations) carries on in
        logarithmic coordinates for the model's ``log_params``, kept where it ends lower.

        Heston's small-``kappa`` valley is the case: with ``kappa T`` small the short and
        middle expiries see ``kappa (theta - v0)`` only, a hyperbola in ``(kappa, theta)``
        along which the LM crawls (one simulated chain stalled 0.13 % above its optimum after
        61 evaluations); in ``(ln kappa, ln theta)`` it is nearly straight, and the run
        reaches the optimum in 18. Only for crawling runs: on the real chains the log
        coordinates cost a few evaluations more than they save."""
        names = getattr(self.model, "log_params", ())
        if not names or best.nfev <= CRAWL_NFEV or not np.isfinite(best.data_cost[0]):
            return best
        mask = np.isin(np.array(self.model.param_names(self.S)), np.array(names))
        lo, hi = self.lo, self.hi
        if not np.all(lo[mask] > 0.0):
            return best

        def evaluate(Y: FloatArray) -> tuple[FloatArray, FloatArray]:
            X = np.where(mask, np.exp(np.where(mask, Y, 0.0)), Y)
            iv, jac = self.evaluate(X)
            return iv, jac * np.where(mask, X[0], 1.0)[None, :]

        problem = self.cfg.problem(
            evaluate,
            self.data,
            self.starts,
            np.where(mask, np.log(np.where(mask, lo, 1.0)), lo)[None, :],
            np.where(mask, np.log(np.where(mask, hi, 1.0)), hi)[None, :],
        )
        y0 = np.where(mask, np.log(np.where(mask, np.maximum(best.x[0], lo), 1.0)), best.x[0])
        secant = bool(getattr(self.model, "secant_lm", False))
        res = solve(problem, y0[None, :], max_iter=self.cfg.max_iter_cold, secant=secant)
        self.nfev += res.nfev
        if not res.data_cost[0] < best.data_cost[0]:
            return best
        x = np.clip(np.where(mask, np.exp(np.where(mask, res.x[0], 0.0)), res.x[0]), lo, hi)
        return replace(res, x=x[None, :])

    def _doubtful(self, runs: list[LMResult]) -> bool:
        """No run ended finite and converged, or the best one's weighted RMS error exceeds
        ``global_fallback_wrms``: the global search runs."""
        ok = [r for r in runs if np.isfinite(r.data_cost[0]) and bool(r.converged[0])]
        if not ok:
            return True
        best = min(ok, key=lambda r: float(r.data_cost[0]))
        return float(block_wrms(best.iv, self.data, self.starts)[0]) > self.cfg.global_fallback_wrms

    def global_fit(self, seeds: list[FloatArray]) -> LMResult:
        """The global search over the box (seeded), polished by the LM."""
        cfg = self.cfg
        problem = cfg.problem(
            self.evaluate, self.data, self.starts, self.lo[None, :], self.hi[None, :]
        )
        found = global_search(self.model, self.data, problem, cfg.global_settings, seeds)
        self.nfev += found.nfev
        return self._solve(found.x, cfg.global_polish_iter)

    # -- 3. the arbitrage gate -------------------------------------------------------------
    def gate(self, best: LMResult) -> tuple[LMResult, list[Violation]]:
        """The model's conditions and the calendar check; a violation is re-fitted inside
        ``safe_bounds`` and marked re-fitted when that fit passes."""
        model, cfg, data = self.model, self.cfg, self.data
        x = best.x[0]
        violations = list(model.arbitrage(x, data.slice_T))
        surface_calendar(model, cfg, x, data, violations, self.prep.listed_k)
        pinned = model.safe_bounds(x, self.lo, self.hi) if violations else None
        if pinned is None:
            return best, violations
        again = self._solve(np.clip(x, pinned[0], pinned[1]), cfg.max_iter_cold, bounds=pinned)
        x2 = again.x[0]
        found: list[Violation] = list(model.arbitrage(x2, data.slice_T))
        surface_calendar(model, cfg, x2, data, found, self.prep.listed_k)
        if not found and np.isfinite(again.data_cost[0]):
            best = replace(again, penalty=np.zeros(1))
            violations = [replace(v, detail=v.detail + REFITTED) for v in violations]
        return best, violations

    # -- 4. the result ---------------------------------------------------------------------
    def result(self, best: LMResult, violations: list[Violation]) -> Fitted:
        model, data, S = self.model, self.data, self.S
        x = best.x[0]
        iv = best.iv
        self.history.prev_wrms[""] = float(block_wrms(iv, data, self.starts)[0])
        self.history.update_band(float(block_band(iv, data, self.starts)[0]))
        view = model.view(x, S)
        atm = model.implied_vol(x, np.zeros(S), data.slice_T, np.arange(S, dtype=np.int64))
        return Fitted(
            iv=iv,
            points=np.ones(data.n_quotes, dtype=np.bool_),
            slices=slice_fits(data, self.prep, iv, atm, view.slices, np.ones(S, dtype=np.bool_)),
            x=(x.copy(),),
            params=view.surface,
            nfev=self.nfev,
            penalty=float(best.penalty[0]),
            warm=self.warm_used,
            regime=self.regime,
            violations=violations,
        )


def warm_vector(
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
