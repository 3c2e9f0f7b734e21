"""The arbitrage gate: no fit with static arbitrage leaves the calibrator.

Per-expiry models (``SliceGate``): first every slice's own conditions (the model's
``arbitrage``: butterfly, Lee's wings) and the calendar gaps between neighbours, all slices at
once (``calendar_gaps``); only when one fails, slice by slice, shortest first: each slice
must pass its own checks and lie above the previous accepted slice (total variance on the
pair's grid, and for ``exact_calendar`` models the exact whole-line test). A failing slice is
re-fitted with the constraints enforced (``streamer.calib.repair``), else falls back to its
last accepted parameters, else (exact-calendar models, calendar findings only) is moved onto
the boundary by the model's ``calendar_repair``, else is left out of the surface.

Surface models: the model's ``arbitrage`` plus ``surface_calendar`` (total variance must not
fall with T where two neighbouring expiries both list strikes); the strategy re-fits inside
``safe_bounds`` or keeps the last good fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from streamer.calib import kernel
from streamer.calib.constraints import common_range, pair_grids
from streamer.calib.options import EXACT_CALENDAR_TOL, CalibConfig
from streamer.calib.repair import check_grid, repair_slice, total_variance
from streamer.models.base import KERNEL_NONE, FitData, FloatArray, Model, Violation

BoolArray = npt.NDArray[np.bool_]
CALENDAR_POINTS = 61  # grid points per pair of slices (surface models)
Prior = dict[str, tuple[FloatArray, float]]  # expiry -> (last accepted parameters, forward)


def calendar_gaps(
    model: Model, X: FloatArray, slice_T: FloatArray, k_cal: FloatArray
) -> FloatArray | None:
    """Per slice ``j >= 1``: the largest fall of total variance from slice ``j-1`` to ``j``
    on ``k_cal[j]`` (entry 0: -inf), for all slices at once; None for a model without a
    row-wise evaluation."""
    S, G = k_cal.shape
    if S < 2:
        return np.full(S, -np.inf)
    if model.kernel_kind != KERNEL_NONE and G > 0:  # one compiled pass, the same gaps
        return np.asarray(
            kernel.calendar_gaps(
                model.kernel_kind,
                model.kernel_arg,
                np.ascontiguousarray(X, dtype=np.float64),
                np.ascontiguousarray(slice_T, dtype=np.float64),
                np.ascontiguousarray(k_cal, dtype=np.float64),
            )
        )
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


def all_clean(
    model: Model,
    cfg: CalibConfig,
    x: FloatArray,
    keep: BoolArray,
    own: list[list[Violation]],
    slice_T: FloatArray,
    k_cal: FloatArray,
) -> bool:
    """The fast path: every slice kept, none with findings of its own, no calendar gap."""
    gaps = calendar_gaps(model, x, slice_T, k_cal) if keep.all() else None
    clean = gaps is not None and not any(own) and bool(np.all(gaps <= cfg.calendar_tol))
    if clean and model.exact_calendar and len(x) > 1:
        clean = bool(np.all(model.calendar_shortfall(x[:-1], x[1:]) <= EXACT_CALENDAR_TOL))
    return clean


def surface_calendar(
    model: Model,
    cfg: CalibConfig,
    x: FloatArray,
    data: FitData,
    violations: list[Violation],
    listed: FloatArray | None = None,
) -> None:
    """Total variance must not fall with T (surface models: a check): each slice against the
    one before it on the pair's common range (``pair_grids``; with ``listed``, the
    ``Prepared.listed_k`` ranges: where both expiries publish IVs, the range the independent
    check of the published IVs compares). Not on the whole chain's quoted range: a daily's
    total variance far beyond its own strikes is that of an option worth ~1e-14 of the
    forward, where the pricer's last digits, not the model, decide the order (a Bates fit of
    a shared ETH chain was refused for a fall at ``k = 1.64`` between two dailies whose
    strikes end near 0.3)."""
    S = data.n_slices
    if S < 2:
        return
    grids = pair_grids(data, CALENDAR_POINTS, listed)[1:]
    G = grids.shape[1]
    j = np.repeat(np.arange(1, S, dtype=np.int64), G)
    k = grids.ravel()
    idx = np.concatenate([j - 1, j])
    T = data.slice_T[idx]
    iv = model.implied_vol(x, np.concatenate([k, k]), T, idx)
    w = iv * iv * T
    gap = (w[: len(k)] - w[len(k) :]).reshape(S - 1, G)
    gap = np.where(np.isfinite(gap), gap, -np.inf)  # a point without a vol checks nothing
    for jj in range(1, S):
        worst = float(np.max(gap[jj - 1]))
        if worst > cfg.calendar_tol:
            violations.append(Violation("calendar", jj, worst, "total variance falls with T"))


@dataclass
class SliceGate:
    """The slice-by-slice gate of one per-expiry fit (``run`` updates ``x`` and ``keep``)."""

    model: Model
    cfg: CalibConfig
    data: FitData
    prior: FloatArray  # (S, p): the last accepted parameters where there are some
    pen_w: FloatArray  # (S, p): the change penalty's weights
    has_prior: BoolArray
    prev: Prior
    # per slice the range its calendar checks cover (``constraints.slice_ranges``): for a
    # slice whose neighbour below was left out, the grid against the next one down spans
    # the two's common range; None: ``k_cal``'s row as given
    ranges: FloatArray | None = None
    # per expiry: when its repair last failed (``History.repair_failed``, updated here) and
    # the fit's venue time; a repair is not tried again within ``cfg.repair_retry_s``
    repair_failed: dict[str, int] | None = None
    ts_ms: int = 0

    def run(
        self,
        x: FloatArray,
        keep: BoolArray,
        own: list[list[Violation]],
        k_cal: FloatArray,
        violations: list[Violation],
    ) -> None:
        """Shortest slice first: check each kept slice against the last accepted one below
        it; fix what fails (or drop it); findings go to ``violations``."""
        k_bf = check_grid(self.data)
        below: int | None = None  # the last accepted slice
        for j in range(self.data.n_slices):
            if not keep[j]:
                continue
            found, w_below, k_grid = self._findings(x, j, below, own[j], k_cal)
            if found:
                violations.extend(replace(v, slice=j) for v in found)
                fixed = self._fix(x, j, below, found, w_below, k_grid, k_bf)
                if fixed is None:
                    keep[j] = False
                    continue
                x[j] = fixed
            below = j

    def crosses(self, x_below: FloatArray, x: FloatArray) -> bool:
        """The exact whole-line calendar test between two slices (``exact_calendar``
        models; others are checked on the grid only)."""
        if not self.model.exact_calendar:
            return False
        gap = self.model.calendar_shortfall(x_below[None, :], x[None, :])
        return bool(gap[0] > EXACT_CALENDAR_TOL)

    def _findings(
        self, x: FloatArray, j: int, below: int | None, own: list[Violation], k_cal: FloatArray
    ) -> tuple[list[Violation], FloatArray | None, FloatArray]:
        """Slice ``j``'s own findings plus its calendar against slice ``below``; also the
        lower slice's total variance and the grid it was taken on (for the fixes)."""
        model, data = self.model, self.data
        found = list(own)
        k_grid = k_cal[j] if j else np.zeros(1)
        if below is None:
            return found, None, k_grid
        if below != j - 1 and self.ranges is not None:  # the slice(s) between were left out
            lo, hi = common_range(self.ranges, below, j)
            k_grid = np.linspace(lo, hi, k_cal.shape[1])
        if model.exact_calendar:  # the repair's grid reaches every k
            k_grid = np.sort(np.concatenate([k_grid, model.calendar_grid(x[below], 61)]))
        w_below = total_variance(model, x[below], k_grid, float(data.slice_T[below]))
        w = total_variance(model, x[j], k_grid, float(data.slice_T[j]))
        fall = float(np.max(w_below - w))
        if fall > self.cfg.calendar_tol:
            found.append(Violation("calendar", j, fall, "total variance falls with T"))
        elif self.crosses(x[below], x[j]):
            found.append(Violation("calendar", j, 1.0, "slices cross beyond the quotes"))
        return found, w_below, k_grid

    def _fix(
        self,
        x: FloatArray,
        j: int,
        below: int | None,
        found: list[Violation],
        w_below: FloatArray | None,
        k_grid: FloatArray,
        k_bf: FloatArray,
    ) -> FloatArray | None:
        """Parameters for slice ``j`` that pass, in order of preference: a constrained
        re-fit, the last accepted ones, the exact calendar repair; None: drop the slice."""
        model, data, tol = self.model, self.data, self.cfg.calendar_tol
        x_below = None if below is None else x[below]
        expiry = data.slice_expiry[j]
        failed = self.repair_failed
        last = None if failed is None else failed.get(expiry)
        fixed: FloatArray | None = None
        if last is None or not 0 <= self.ts_ms - last < self.cfg.repair_retry_s * 1000.0:
            fixed = repair_slice(
                model, x[j], data.slice(j), self.residuals(j), w_below, k_bf, k_grid, tol
            )
            if fixed is not None and x_below is not None and self.crosses(x_below, fixed):
                fixed = None
            if failed is not None:
                if fixed is None:
                    failed[expiry] = self.ts_ms
                else:
                    failed.pop(expiry, None)
        if fixed is None and data.slice_expiry[j] in self.prev:
            fixed = self._previous(j, x_below, w_below, k_grid)
        if (
            fixed is None
            and model.exact_calendar
            and x_below is not None
            and all(v.check == "calendar" for v in found)
        ):
            fixed = model.calendar_repair(x_below, x[j])
            if self.crosses(x_below, fixed) or model.arbitrage(fixed, data.slice_T[j : j + 1]):
                fixed = None
        return fixed

    def _previous(
        self, j: int, x_below: FloatArray | None, w_below: FloatArray | None, k_grid: FloatArray
    ) -> FloatArray | None:
        """Slice ``j``'s last accepted parameters, if they pass against today's neighbour."""
        model, data = self.model, self.data
        cand = self.prev[data.slice_expiry[j]][0]
        wc = total_variance(model, cand, k_grid, float(data.slice_T[j]))
        ok = (
            not model.arbitrage(cand, data.slice_T[j : j + 1])
            and (w_below is None or np.max(w_below - wc) <= self.cfg.calendar_tol)
            and (x_below is None or not self.crosses(x_below, cand))
        )
        return cand if ok else None

    def residuals(self, j: int) -> Callable[[FloatArray], FloatArray]:
        """Slice ``j``'s weighted residuals (the configured objective) plus its change-penalty
        rows: what the constrained re-fit minimises."""
        cfg, model, d = self.cfg, self.model, self.data.slice(j)
        band = cfg.band(d)
        z = np.zeros(d.n_quotes, dtype=np.int64)
        prior, pen_w, has_prior = self.prior[j], self.pen_w[j], bool(self.has_prior[j])

        def residuals(xj: FloatArray) -> FloatArray:
            e = model.implied_vol(xj, d.k, d.T, z) - d.iv
            if band is not None:
                e = cfg.kappa * e + (e - np.clip(e, -band, band))
            r = d.weight * e
            if has_prior:
                r = np.concatenate([r, pen_w * (xj - prior)])
            return np.asarray(np.where(np.isfinite(r), r, 1e3))

        return residuals
