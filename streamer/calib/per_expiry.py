"""The per-expiry strategy (SVI, SABR, eSSVI, ...): all slices as blocks of one LM run.

``fit_slices(model, history, ts_ms, prepared, t0)`` in named steps:

1. ``_SliceFit.__init__`` (data): bounds per slice, and from the last accepted fit each
   slice's prior, its change-penalty weights ``sqrt(lambda) / s`` and whether its forward
   jumped (``regime_forward_move``). Slices (expiries) the last fit did not have start cold
   and carry no penalty.
2. ``warm`` (start, solve): from the priors, with the penalty; then the regime tests per
   slice: a forward jump, an error jump (``History.jumped``), the in-band share of all slices
   slipping (``History.slipped``), or a long gap since the last fit.
3. ``cold`` (solve): penalty-free fits of the slices that need one (new, or shifted) from
   the warm result and the model's cold guesses; kept where the data fit beats the warm one
   by ``cold_margin``.
4. ``gate``: the arbitrage gate (``streamer.calib.gate``): the fast all-slice check, else
   slice by slice.
5. ``result``: per-slice statistics, the regime references for the next fit, ``Fitted``.

The LM is compiled (``streamer.calib.kernel``) for models with a scalar row kernel, else
``streamer.calib.lm.solve`` with one vectorised model evaluation per iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from streamer.calib import kernel
from streamer.calib.constraints import (
    hinge_grids,
    hinge_rows,
    pair_grids,
    pair_ranges,
    slice_ranges,
)
from streamer.calib.data import Prepared
from streamer.calib.evaluate import fitted_iv, slice_evaluator
from streamer.calib.gate import Prior, SliceGate, all_clean
from streamer.calib.lm import LMResult, solve
from streamer.calib.lm_steps import STALL_ITERS, STALL_RTOL
from streamer.calib.options import CalibConfig, History
from streamer.calib.result import (
    Failure,
    FitResult,
    Fitted,
    block_stats,
    slice_fits,
    starts_of,
    wrms_of,
)
from streamer.models.base import KERNEL_NONE, KERNEL_SPLINE, FitData, FloatArray, Model, Violation

BoolArray = npt.NDArray[np.bool_]
COLD_STALL = (STALL_ITERS, STALL_RTOL)  # the LM's own stall rule (``streamer.calib.lm``)
# run(x0, prior, pen_w, max_iter, active, stall): stall = (iterations, share of the cost)
Runner = Callable[
    [FloatArray, FloatArray | None, FloatArray | None, int, BoolArray | None, tuple[int, float]],
    LMResult,
]


def fit_slices(model: Model, history: History, ts_ms: int, prep: Prepared) -> Fitted | Failure:
    """One per-expiry calibration: the accepted fit, or why there is none."""
    fit = _SliceFit(model, history, ts_ms, prep)
    fit.warm()
    fit.cold()
    if not fit.gate():
        return Failure("no slice passed the fit and arbitrage checks", fit.nfev, fit.violations)
    return fit.result()


def prev_slices(last: FitResult | None) -> Prior:
    """The last accepted fit by expiry: (parameters, forward)."""
    if last is None or not last.slices or len(last.x) != len(last.slices):
        return {}
    return {s.expiry: (x, s.forward) for s, x in zip(last.slices, last.x, strict=True)}


class _SliceFit:
    """The working state of one per-expiry fit, step by step."""

    def __init__(self, model: Model, history: History, ts_ms: int, prep: Prepared) -> None:
        self.model, self.history, self.prep = model, history, prep
        self.ts_ms = ts_ms
        self.cfg: CalibConfig = history.config
        data = self.data = prep.data
        S = self.S = data.n_slices
        lo, hi = model.bounds(1)
        self.lo = lo
        self.starts = starts_of(data.slice_idx, S)
        self.lower, self.upper = np.repeat(lo[None, :], S, axis=0), np.repeat(hi[None, :], S, 0)
        self.prev = prev_slices(history.last_good)
        self.prior = np.zeros((S, len(lo)))
        self.pen_w = np.zeros((S, len(lo)))
        self.has_prior = np.zeros(S, dtype=np.bool_)
        self.fwd_jump = np.zeros(S, dtype=np.bool_)
        root_pen = math.sqrt(history.penalty_now(ts_ms)) if self.prev else 0.0
        # the slices the last fit had: their priors, penalty weights and forward jumps at once
        rows, x_prev, f_prev = [], [], []
        for j, e in enumerate(data.slice_expiry):
            got = self.prev.get(e)
            if got is not None:
                rows.append(j)
                x_prev.append(got[0])
                f_prev.append(got[1])
        if rows:
            self.prior[rows] = x_prev
            self.has_prior[rows] = True
            self.pen_w[rows] = root_pen / model.slice_scales(data.slice_T[rows])
            jump = np.abs(data.slice_forward[rows] / np.array(f_prev) - 1.0)
            self.fwd_jump[rows] = jump > self.cfg.regime_forward_move
        self.gap = history.gap_shift(ts_ms)
        # the calendar checks' ranges per neighbouring pair (the hinge rows' and the gate's)
        self.pairs = pair_ranges(data, listed=prep.listed_k)
        self.run = _runner(self)
        self.nfev = 0
        self.warm_used = bool(self.has_prior.any())
        self.x = np.zeros((S, len(lo)))
        self.iv = np.zeros(data.n_quotes)
        self.data_cost = np.full(S, np.inf)
        self.pen = np.zeros(S)
        self.shift = np.zeros(S, dtype=np.bool_)
        self.keep = np.ones(S, dtype=np.bool_)
        self.violations: list[Violation] = []
        self._guesses: dict[int, list[FloatArray]] = {}
        # ``block_stats`` of the IVs ``_stats_of`` (the warm fit's, reused by ``result`` when
        # neither the cold fits nor the gate replaced them)
        self._stats: FloatArray | None = None
        self._stats_of: FloatArray | None = None

    def guess(self, j: int) -> list[FloatArray]:
        """Slice ``j``'s cold-start candidates (computed once, when first needed)."""
        if j not in self._guesses:
            self._guesses[j] = self.model.initial_guesses(self.data.slice(j))
        return self._guesses[j]

    # -- 2. warm start ---------------------------------------------------------------------
    def warm(self) -> None:
        """The penalised fit from the last accepted parameters, and the regime tests."""
        if not self.warm_used:
            return
        data, cfg, hist = self.data, self.cfg, self.history
        if self.has_prior.all():
            x0 = self.prior
        else:
            x0 = np.array(
                [self.prior[j] if self.has_prior[j] else self.guess(j)[0] for j in range(self.S)]
            )
        res = self.run(x0, self.prior, self.pen_w, cfg.max_iter_warm, None, cfg.warm_stall)
        self.nfev += res.nfev
        self.x, self.iv, self.data_cost, self.pen = res.x, res.iv, res.data_cost, res.penalty
        stats = self._stats = block_stats(self.iv, data, self.starts)
        self._stats_of = self.iv
        wrms = wrms_of(stats).tolist()
        # the in-band share over all slices (one slice's share is too noisy to judge)
        slipped = hist.slipped(float(stats[:, 2].sum()) / max(data.n_quotes, 1))
        prior = self.has_prior.tolist()
        err_jump = np.array(
            [
                prior[j] and (slipped or hist.jumped(e, wrms[j]))
                for j, e in enumerate(data.slice_expiry)
            ],
            dtype=np.bool_,
        )
        self.shift = (self.fwd_jump | err_jump | self.gap) & self.has_prior

    # -- 3. cold starts --------------------------------------------------------------------
    def cold(self) -> None:
        """Penalty-free fits of new and shifted slices; kept where they fit clearly better."""
        need = self.shift | ~self.has_prior
        if not need.any():
            return
        c = self._multi_start(need, self.x if self.warm_used else None)
        self.nfev += c.nfev
        take = need & (
            ~self.has_prior
            | (c.data_cost < self.cfg.cold_margin * self.data_cost)
            | ~np.isfinite(self.data_cost)
        )
        pt = take[self.data.slice_idx]
        self.x = np.where(take[:, None], c.x, self.x)
        self.iv = np.where(pt, c.iv, self.iv)
        self.data_cost = np.where(take, c.data_cost, self.data_cost)
        self.pen = np.where(take, 0.0, self.pen)

    def _multi_start(self, mask: BoolArray, free: FloatArray | None) -> LMResult:
        """Penalty-free fits of the masked slices from the multi-start guesses and, when
        given, from ``free`` (the warm result: the cheap answer to a gradual shift)."""
        S, prior = self.S, self.prior
        guesses = [
            ([free[j]] if free is not None and self.has_prior[j] else []) + self.guess(j)
            if mask[j]
            else [prior[j]]
            for j in range(S)
        ]
        best: LMResult | None = None
        for g in range(max(len(guesses[j]) for j in range(S))):
            x0 = np.array([guesses[j][min(g, len(guesses[j]) - 1)] for j in range(S)])
            x0 = np.where(mask[:, None], x0, prior)
            res = self.run(x0, None, None, self.cfg.max_iter_cold, mask, COLD_STALL)
            best = res if best is None else _merge_best(best, res, self.data)
        assert best is not None
        return best

    # -- 4. the arbitrage gate -------------------------------------------------------------
    def gate(self) -> bool:
        """All slices' own checks and calendar gaps at once; only when one fails, the
        slice-by-slice gate (repair, last accepted parameters, or drop). False: none left."""
        model, data, x = self.model, self.data, self.x
        keep = self.keep = np.isfinite(self.data_cost) & np.all(np.isfinite(x), axis=1)
        own = model.arbitrage_slices(np.where(keep[:, None], x, self.lo), data.slice_T)
        k_cal = pair_grids(data, 61, self.prep.listed_k, self.pairs)
        if all_clean(model, self.cfg, x, keep, own, data.slice_T, k_cal):
            return True
        failed = self.history.repair_failed
        for e in [e for e in failed if e not in data.slice_expiry]:  # settled, or not fitted
            del failed[e]
        gate = SliceGate(
            model, self.cfg, data, self.prior, self.pen_w, self.has_prior, self.prev,
            slice_ranges(data, self.prep.listed_k), failed, self.ts_ms,
        )  # fmt: skip
        gate.run(x, keep, own, k_cal, self.violations)
        if not keep.any():
            return False
        self.iv = fitted_iv(model, x, data)
        return True

    # -- 5. the result ---------------------------------------------------------------------
    def result(self) -> Fitted:
        """Statistics of the kept slices; the regime references for the next fit."""
        model, data, keep, iv, x = self.model, self.data, self.keep, self.iv, self.x
        stats = self._stats
        if stats is None or self._stats_of is not iv:
            stats = block_stats(iv, data, self.starts)
        wrms = wrms_of(stats).tolist()
        kept = keep.tolist()
        for j, e in enumerate(data.slice_expiry):
            if kept[j]:
                self.history.prev_wrms[e] = wrms[j]
        pts = keep[data.slice_idx]
        # over the kept slices' quotes: RMS of (fitted - mid), in-band share, count
        n_kept, sq_kept, in_kept = (float(v) for v in stats[keep, :3].sum(axis=0))
        band = in_kept / n_kept if n_kept else math.nan
        self.history.update_band(band)
        atm = model.implied_vol_slices(x, data.slice_T)
        params = _slice_params(model, x)
        return Fitted(
            iv=iv,
            points=pts,
            slices=slice_fits(data, self.prep, iv, atm, params, keep, stats),
            x=tuple(x[keep]),  # rows of a copy
            params={},
            nfev=self.nfev,
            penalty=float(np.sum(self.pen[keep])),
            warm=self.warm_used,
            regime=bool(self.shift.any()),
            violations=self.violations,
            totals=(math.sqrt(sq_kept / n_kept) if n_kept else math.nan, band, int(n_kept)),
        )


def _slice_params(model: Model, x: FloatArray) -> list[dict[str, float]]:
    """Each slice row's named parameters: ``model.view(x[j], 1).slices[0]``, without the
    detour for models whose ``view`` keeps the base class's slices (the base ``view``, or
    ``Model.plain_slice_view``: one dict per slice)."""
    if type(model).view is Model.view or model.plain_slice_view:
        names = model.param_names(1)
        return [dict(zip(names, row, strict=True)) for row in x.tolist()]
    return [model.view(x[j], 1).slices[0] for j in range(x.shape[0])]


def _runner(fit: _SliceFit) -> Runner:
    """``run(x0, prior, pen_w, max_iter, active)``: the block LM over all slices, compiled
    (``streamer.calib.kernel``) for models with a row kernel, else ``lm.solve`` (which fits
    every slice: ``active`` only saves work)."""
    model, cfg, data, lower = fit.model, fit.cfg, fit.data, fit.lower
    if model.kernel_kind == KERNEL_NONE:
        return _numpy_runner(fit)
    S, p = lower.shape
    # the spline's butterfly rows live on its own knot grid (``spline_hinges_fixed``)
    own_bf = model.kernel_kind == KERNEL_SPLINE
    grids = hinge_grids(data, fit.prep.listed_k, fit.pairs, butterfly=not own_bf)
    band = cfg.band(data)
    zeros = np.zeros((S, p))
    compiled = kernel.SliceProblem(
        kind=model.kernel_kind,
        arg=model.kernel_arg,
        k=data.k,
        T=data.T,
        target=data.iv,
        weight=data.weight,
        band=np.zeros(0) if band is None else band,
        kappa=cfg.kappa,
        loss=kernel.LOSS_CODES[cfg.loss],
        f_scale=cfg.f_scale,
        starts=fit.starts,
        lower=lower,
        upper=fit.upper,
        hinges=cfg.constraints_in_fit,
        inner=grids[0],
        outer=grids[1],
        kcal=grids[2],
        slice_T=data.slice_T,
        cache=_geometry_cache(fit.history, S) if own_bf else None,
    )

    def run_kernel(
        x0: FloatArray,
        prior: FloatArray | None,
        pen_w: FloatArray | None,
        max_iter: int,
        active: BoolArray | None,
        stall: tuple[int, float],
    ) -> LMResult:
        return compiled.solve(
            x0,
            zeros if prior is None else prior,
            zeros if pen_w is None else pen_w,
            np.ones(S, dtype=np.bool_) if active is None else active,
            max_iter,
            stall,
        )

    return run_kernel


def _geometry_cache(history: History, S: int) -> kernel.GeometryCache:
    """The spline's hinge geometry kept in ``history`` between fits (``kernel.fit_slices_cached``
    rebuilds a slice's only when its knot map changed), a new one when the slice count did.
    One fit at a time per ``History`` (as one ``Calibrator`` fits)."""
    cache = history.geometry
    if cache is None or cache[0].shape[0] != S:
        cache = history.geometry = kernel.geometry_cache(S, True)
    return cache


def _numpy_runner(fit: _SliceFit) -> Runner:
    """The numpy LM (``lm.solve``) over all slices, one model evaluation per iteration."""
    model, cfg, data, starts, lower, upper = (
        fit.model, fit.cfg, fit.data, fit.starts, fit.lower, fit.upper
    )  # fmt: skip
    evaluate = slice_evaluator(model, data)
    hinges = hinge_rows(model, data, fit.prep.listed_k) if cfg.constraints_in_fit else None

    def run_numpy(
        x0: FloatArray,
        prior: FloatArray | None,
        pen_w: FloatArray | None,
        max_iter: int,
        active: BoolArray | None,
        stall: tuple[int, float],
    ) -> LMResult:
        problem = cfg.problem(evaluate, data, starts, lower, upper, prior, pen_w, hinges)
        return solve(problem, x0, max_iter=max_iter)

    return run_numpy


def _merge_best(a: LMResult, b: LMResult, data: FitData) -> LMResult:
    """Per slice, the better data fit of two runs."""
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
