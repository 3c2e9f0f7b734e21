r"""The block Levenberg-Marquardt of ``streamer.calib.lm``, compiled, for per-expiry models.

Same objective, same steps, same stopping rules as ``lm.solve`` with the no-arbitrage hinge
rows of ``streamer.calib.constraints`` (butterfly on an inner and an outer grid per slice,
calendar against the shorter neighbour), but for models with a scalar numba kernel
(``Model.kernel_kind``: SVI, SABR, eSSVI) it runs as one compiled call: per point the model
gives its IV and analytic gradient (``svi_row``, ``sabr_row``, ``essvi_row``), and the
``p x p`` normal equations (``p <= 5``) are solved by Gaussian elimination with partial
pivoting. A 12-slice SVI warm fit takes about 0.14 ms here against 1.3 ms in numpy (most of
it the hinge rows' array bookkeeping).

The spline (``KERNEL_SPLINE``, up to 14 parameters, sparse rows) keeps its knot map frozen
through a run, so each slice run builds its fixed rows once (``Geometry``: the quotes' and
the calendar grid's design rows, the hinge grid's ``w, w', w''`` rows, the roughness matrix)
and every evaluation is then a few dot products (a 12-slice evaluation 4x cheaper than
locating every point in the knot grid afresh).

Differences: a warm refit may pass its own stall rule (``CalibConfig.warm_stall``: a slice
stops when 3 iterations bought less than 0.1 % of its cost; the numpy LM keeps its fixed
rule), and slices are solved one after the other, shortest first, so slice ``j``'s
calendar rows see slice ``j-1`` at its *final* parameters (the numpy version uses the
neighbour's parameters of the same iteration). For eSSVI the calendar rows sit on the
neighbour's whole-line grid (``essvi_calendar_grid``) instead of the quoted range. Blocks
with ``active[j] = False`` are kept at their start values (a regime fit of a few slices does
not re-fit the rest).

``nfev`` is the largest number of evaluations any slice needed: the numpy version's count,
where one evaluation covers every slice. Kernels use numba's ``error_model="numpy"``: a
division by zero gives inf/NaN, which the LM treats like numpy's (a rejected step, a
skipped point), instead of raising.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numba import njit

from streamer.calib.constraints import (
    BUTTERFLY_MARGIN,
    MU_BUTTERFLY,
    MU_CALENDAR,
    W_SCALE,
)
from streamer.calib.lm import LMResult
from streamer.calib.lm_steps import BAD_ROW, MU_INIT, MU_MAX, STALL_ITERS, STALL_RTOL
from streamer.calib.lm_steps import rho as _rho
from streamer.calib.lm_steps import solve_small as _solve_small
from streamer.models.base import (
    KERNEL_ESSVI,
    KERNEL_SABR,
    KERNEL_SPLINE,
    KERNEL_SVI,
    FloatArray,
    IntArray,
)
from streamer.models.essvi import essvi_calendar_grid, essvi_row
from streamer.models.sabr import sabr_row
from streamer.models.spline import CAL_ABS as SPLINE_CAL_ABS
from streamer.models.spline import CAL_MU as SPLINE_MU_CALENDAR
from streamer.models.spline import CAL_REL as SPLINE_CAL_REL
from streamer.models.spline import HINGE_MARGIN as SPLINE_MARGIN
from streamer.models.spline import HINGE_MU as SPLINE_MU
from streamer.models.spline import I_S as SPLINE_I_S
from streamer.models.spline import N_HINGE as SPLINE_HINGE_ROWS
from streamer.models.spline import N_HINGE_BF as SPLINE_HINGE_BF
from streamer.models.spline import N_HINGE_GRID as SPLINE_HINGE_GRID
from streamer.models.spline import NC as SPLINE_NC
from streamer.models.spline import ROUGHNESS as SPLINE_ROUGHNESS
from streamer.models.spline import (
    hinges_fixed_into,
    iv_knots,
    spline_design,
    spline_geometry,
    spline_knots,
    spline_row,
    spline_row_design,
)
from streamer.models.svi import svi_row

LOSS_CODES = {"linear": 0, "soft_l1": 1, "huber": 2}

# the tuples the kernels pass around (numba takes them as they are; the names are for reading)
ModelArgs = tuple[int, float, float, int, float]  # kind, arg, kappa, loss code, f_scale^2
Quotes = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]  # k, T, target, w, band
Penalty = tuple[FloatArray, FloatArray]  # prior, weights
# use, has a neighbour, T, neighbour's w, inner grid, outer grid, calendar grid
Hinge = tuple[bool, bool, float, FloatArray, FloatArray, FloatArray, FloatArray]
# the generic butterfly's w and dw on a grid; per-point and hinge scratch rows (``SCRATCH_ROWS``
# x max(p, spline N_HINGE_BF)); the slice run's ``spline_knots`` (spline: its knot map is frozen)
Scratch = tuple[FloatArray, FloatArray, FloatArray, FloatArray]
SCRATCH_ROWS = 7  # 0-4: the spline's hinge rows (``hinges_fixed_into``), 5: a point's gradient
# the spline's fixed geometry of one slice run (``spline.spline_design``, ``spline_geometry``):
# design rows of the quotes, the hinge grid and its w, w', w'' rows, the roughness matrix, the
# calendar grid's design rows (empty for other models)
Geometry = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]
# two slots each: iv, jac, residual, loss slope, band slope, hinge rows, hinge jacobian
Buffers = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]
FTOL = 1e-5  # relative cost reduction below which a slice has converged
XTOL = 1e-9  # relative parameter move below which a slice has converged


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def row(kind: int, arg: float, x: FloatArray, k: float, T: float, jac: FloatArray) -> float:
    """IV and gradient of one point under model ``kind``."""
    if kind == KERNEL_SVI:
        return svi_row(x, k, T, jac)
    if kind == KERNEL_SABR:
        return sabr_row(x, k, T, arg, jac)
    if kind == KERNEL_ESSVI:
        return essvi_row(x, k, T, jac)
    if kind == KERNEL_SPLINE:
        return spline_row(x, k, T, jac)
    return math.nan


@njit(cache=True, nogil=True, error_model="numpy")
def rows_iv(
    kind: int, arg: float, X: FloatArray, idx: np.ndarray, k: FloatArray, T: FloatArray
) -> FloatArray:
    """IVs of points ``(k[i], T[i])`` under slice ``idx[i]``'s parameters ``X[idx[i]]``."""
    out = np.empty(k.shape[0])
    jac = np.empty(X.shape[1])
    spline = kind == KERNEL_SPLINE
    at = -1
    kn = (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    for i in range(k.shape[0]):
        if spline:  # no gradient needed; the knot constants once per run of one slice
            if idx[i] != at:
                at = idx[i]
                kn = spline_knots(X[at])
            out[i] = iv_knots(X[at], kn, k[i], T[i])
        else:
            out[i] = row(kind, arg, X[idx[i]], k[i], T[i], jac)
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def calendar_gaps(
    kind: int, arg: float, X: FloatArray, slice_T: FloatArray, k_cal: FloatArray
) -> FloatArray:
    """Per slice ``j >= 1``: the largest ``w_{j-1}(k) - w_j(k)`` over ``k_cal[j]`` (NaN if
    any is NaN, as ``np.max``); entry 0: -inf. ``gate.calendar_gaps`` for models with a row
    kernel, in one pass (the same IVs as ``rows_iv``)."""
    S, G = k_cal.shape
    out = np.full(S, -np.inf)
    jac = np.empty(X.shape[1])
    spline = kind == KERNEL_SPLINE
    kn_p = spline_knots(X[0]) if spline else (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    for j in range(1, S):
        T_j, T_p = slice_T[j], slice_T[j - 1]
        best = -np.inf
        kn_j = spline_knots(X[j]) if spline else kn_p
        for g in range(G):
            k = k_cal[j, g]
            if spline:  # ``spline_iv``'s values, the knot map's constants once per slice
                iv_j = iv_knots(X[j], kn_j, k, T_j)
                iv_p = iv_knots(X[j - 1], kn_p, k, T_p)
            else:
                iv_j = row(kind, arg, X[j], k, T_j, jac)
                iv_p = row(kind, arg, X[j - 1], k, T_p, jac)
            gap = iv_p * iv_p * T_p - iv_j * iv_j * T_j
            if math.isnan(gap) or math.isnan(best):
                best = math.nan
            elif gap > best:
                best = gap
        out[j] = best
        kn_p = kn_j
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _data(
    kind: int,
    arg: float,
    x: FloatArray,
    lo: int,
    hi: int,
    k: FloatArray,
    T: FloatArray,
    target: FloatArray,
    weight: FloatArray,
    band: FloatArray,
    kappa: float,
    loss: int,
    f2: float,
    iv: FloatArray,
    jac: FloatArray,
    r: FloatArray,
    drho: FloatArray,
    slope: FloatArray,
    design: FloatArray,
    tmp: FloatArray,
) -> float:
    """Evaluate points ``lo..hi`` at ``x``: IVs, gradients, residuals, loss slopes; the data
    cost ``1/2 f^2 sum rho(r^2/f^2)`` (inf when anything is non-finite). The spline's points
    from their design rows ``design`` (``Geometry``); ``tmp``: scratch of ``p``."""
    use_band = band.shape[0] > 0
    spline = kind == KERNEL_SPLINE
    cost = 0.0
    for i in range(lo, hi):
        if spline:
            v = spline_row_design(x, design[i], T[i], jac[i])
        else:
            v = row(kind, arg, x, k[i], T[i], tmp)
            jac[i, :] = tmp
        iv[i] = v
        e = v - target[i]
        if use_band:
            bw = band[i]
            outside = e - min(max(e, -bw), bw)
            ri = weight[i] * (kappa * e + outside)
            slope[i] = kappa + (1.0 if abs(e) > bw else 0.0)
        else:
            ri = weight[i] * e
            slope[i] = 1.0
        r[i] = ri
        rho, d = _rho(ri * ri / f2, loss)
        drho[i] = d
        cost += rho
    cost = 0.5 * f2 * cost
    return cost if math.isfinite(cost) else math.inf


@njit(cache=True, nogil=True, error_model="numpy")
def _butterfly(
    kind: int,
    arg: float,
    x: FloatArray,
    grid: FloatArray,
    Tj: float,
    w: FloatArray,
    dw: FloatArray,
    rows: FloatArray,
    ejac: FloatArray,
    at: int,
    tmp: FloatArray,
) -> int:
    """Butterfly hinge rows on a uniform grid (``constraints._butterfly``), written from row
    ``at`` on; returns the next free row (``tmp``: scratch of ``p``)."""
    G = grid.shape[0]
    p = x.shape[0]
    for i in range(G):
        v = row(kind, arg, x, grid[i], Tj, tmp)
        w[i] = v * v * Tj
        s = 2.0 * v * Tj
        for q in range(p):
            dw[i, q] = tmp[q] * s
    h = grid[1] - grid[0]
    for i in range(1, G - 1):
        kc = grid[i]
        w1 = (w[i + 1] - w[i - 1]) / (2.0 * h)
        w2 = (w[i + 1] - 2.0 * w[i] + w[i - 1]) / (h * h)
        wc = max(w[i], 1e-12)
        a = 1.0 - kc * w1 / (2.0 * wc)
        g = a * a - 0.25 * w1 * w1 * (1.0 / wc + 0.25) + 0.5 * w2
        if g < BUTTERFLY_MARGIN:
            rows[at] = MU_BUTTERFLY * (BUTTERFLY_MARGIN - g)
            dg_dwc = a * kc * w1 / (wc * wc) + 0.25 * w1 * w1 / (wc * wc)
            dg_dw1 = -a * kc / wc - 0.5 * w1 * (1.0 / wc + 0.25)
            for q in range(p):
                dw1 = (dw[i + 1, q] - dw[i - 1, q]) / (2.0 * h)
                dw2 = (dw[i + 1, q] - 2.0 * dw[i, q] + dw[i - 1, q]) / (h * h)
                ejac[at, q] = -MU_BUTTERFLY * (dg_dwc * dw[i, q] + dg_dw1 * dw1 + 0.5 * dw2)
        else:
            rows[at] = 0.0
            for q in range(p):
                ejac[at, q] = 0.0
        at += 1
    return at


@njit(cache=True, nogil=True, error_model="numpy")
def _hinges(
    kind: int,
    arg: float,
    x: FloatArray,
    w_prev: FloatArray,
    has_prev: bool,
    Tj: float,
    inner: FloatArray,
    outer: FloatArray,
    kcal: FloatArray,
    scratch: Scratch,
    rows: FloatArray,
    ejac: FloatArray,
    geo: Geometry,
) -> float:
    """All hinge rows of one slice; returns their cost ``1/2 sum rows^2``. ``w_prev``: the
    shorter neighbour's total variance on ``kcal`` (fixed while this slice is fitted)."""
    w, dw, work, kv = scratch
    p = x.shape[0]
    tmp = work[5, :p]
    if kind == KERNEL_SPLINE:  # analytic g on the spline's own grid, and its roughness rows
        _, kh, hw, h1, h2, rough, _ = geo
        kn = (kv[0], kv[1], kv[2], kv[3], kv[4], kv[5], kv[6], kv[7])
        at = hinges_fixed_into(
            x, kn, kh, hw, h1, h2, rough, SPLINE_MARGIN, SPLINE_MU, SPLINE_ROUGHNESS, rows, ejac,
            0, work,
        )  # fmt: skip
    else:
        at = _butterfly(kind, arg, x, inner, Tj, w, dw, rows, ejac, 0, tmp)
        at = _butterfly(kind, arg, x, outer, Tj, w, dw, rows, ejac, at, tmp)
    if has_prev:
        spline = kind == KERNEL_SPLINE
        mu_cal = SPLINE_MU_CALENDAR if spline else MU_CALENDAR
        dcal = geo[6]
        for i in range(kcal.shape[0]):
            if spline:
                v = spline_row_design(x, dcal[i], Tj, tmp)
            else:
                v = row(kind, arg, x, kcal[i], Tj, tmp)
            gap = w_prev[i] - v * v * Tj
            if spline:  # stiff, with a margin: the gate's grid is not the hinge grid
                gap += SPLINE_CAL_ABS + SPLINE_CAL_REL * w_prev[i]
            if gap > 0.0:
                rows[at] = mu_cal * gap / W_SCALE
                for q in range(p):
                    ejac[at, q] = -mu_cal * 2.0 * v * Tj * tmp[q] / W_SCALE
            else:
                rows[at] = 0.0
                for q in range(p):
                    ejac[at, q] = 0.0
            at += 1
    cost = 0.0
    for i in range(at):
        if not math.isfinite(rows[i]):
            rows[i] = BAD_ROW
        for q in range(p):
            if not math.isfinite(ejac[i, q]):
                ejac[i, q] = 0.0
        cost += rows[i] * rows[i]
    for i in range(at, rows.shape[0]):
        rows[i] = 0.0
        for q in range(p):
            ejac[i, q] = 0.0
    return 0.5 * cost


@njit(cache=True, nogil=True, error_model="numpy")
def _evaluate(
    model: ModelArgs,
    x: FloatArray,
    lo: int,
    hi: int,
    quotes: Quotes,
    penalty: Penalty,
    hinge: Hinge,
    scratch: Scratch,
    bufs: Buffers,
    s: int,
    geo: Geometry,
) -> tuple[float, float]:
    """Data cost and penalty (change penalty plus hinge rows) of one slice at ``x``, with
    residuals, gradients and hinge rows written to slot ``s`` of the two-slot buffers."""
    kind, arg, kappa, loss, f2 = model
    k, T, target, weight, band = quotes
    use_hinges, has_prev, Tj, w_prev, inner, outer, k_cal = hinge
    iv, jac, r, drho, slope, erows, ejac = bufs
    dc = _data(
        kind, arg, x, lo, hi, k, T, target, weight, band, kappa, loss, f2, iv[s], jac[s], r[s],
        drho[s], slope[s], geo[0], scratch[2][5, : x.shape[0]],
    )  # fmt: skip
    pc = _penalty(x, penalty[0], penalty[1])
    if use_hinges:
        pc += _hinges(
            kind, arg, x, w_prev, has_prev, Tj, inner, outer, k_cal, scratch, erows[s], ejac[s],
            geo,
        )  # fmt: skip
    return dc, pc


@njit(cache=True, nogil=True, error_model="numpy")
def _penalty(x: FloatArray, prior: FloatArray, pw: FloatArray) -> float:
    s = 0.0
    for q in range(x.shape[0]):
        d = pw[q] * (x[q] - prior[q])
        s += d * d
    return 0.5 * s


@njit(cache=True, nogil=True, error_model="numpy")
def _neighbour(
    kind: int,
    arg: float,
    x_prev: FloatArray,
    T_prev: float,
    kcal_b: FloatArray,
    k_cal: FloatArray,
    w_prev: FloatArray,
    tmp: FloatArray,
) -> None:
    """The calendar hinge grid ``k_cal`` of a slice and the shorter neighbour's total variance
    on it (``w_prev``), from the neighbour's final fit (eSSVI: a grid over every ``k``)."""
    if kind == KERNEL_ESSVI:
        essvi_calendar_grid(x_prev, k_cal)
    else:
        k_cal[:] = kcal_b
    kn = spline_knots(x_prev) if kind == KERNEL_SPLINE else (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    for i in range(k_cal.shape[0]):
        if kind == KERNEL_SPLINE:  # no gradient needed (``spline_iv``'s value)
            v = iv_knots(x_prev, kn, k_cal[i], T_prev)
        else:
            v = row(kind, arg, x_prev, k_cal[i], T_prev, tmp)
        w_prev[i] = v * v * T_prev


@njit(cache=True, nogil=True, error_model="numpy")
def _normal_equations(
    x: FloatArray,
    lo: int,
    hi: int,
    weight: FloatArray,
    prior: FloatArray,
    pen_w: FloatArray,
    use_hinges: bool,
    bufs: Buffers,
    cur: int,
    A: FloatArray,
    g: FloatArray,
    sparse: bool,
    nz: IntArray,
) -> None:
    """``A = J'J``, ``g = J'r`` at the current point: IRLS-scaled data rows (non-finite ones
    skipped), penalty rows, hinge rows. ``sparse`` (the spline: a row touches at most six of
    its parameters): only each row's non-zero gradient entries enter the products (``nz``:
    scratch for their positions, ``p`` entries)."""
    iv, jac, r, drho, slope, erows, ejac = bufs
    p = x.shape[0]
    for a_ in range(p):
        g[a_] = 0.0
        for c_ in range(p):
            A[a_, c_] = 0.0
    for i in range(lo, hi):
        sd = math.sqrt(drho[cur, i])
        rs = r[cur, i] * sd
        ok = math.isfinite(rs) and math.isfinite(iv[cur, i])
        for q in range(p):
            if not math.isfinite(jac[cur, i, q]):
                ok = False
        if not ok:
            continue
        ws = weight[i] * slope[cur, i] * sd
        if sparse:
            n_nz = 0
            for q in range(p):
                if jac[cur, i, q] != 0.0:
                    nz[n_nz] = q
                    n_nz += 1
            for ia in range(n_nz):
                a_ = nz[ia]
                ja = ws * jac[cur, i, a_]
                g[a_] += ja * rs
                for ic in range(ia, n_nz):
                    A[a_, nz[ic]] += ja * ws * jac[cur, i, nz[ic]]
            continue
        for a_ in range(p):
            ja = ws * jac[cur, i, a_]
            g[a_] += ja * rs
            for c_ in range(a_, p):
                A[a_, c_] += ja * ws * jac[cur, i, c_]
    for a_ in range(p):
        for c_ in range(a_):
            A[a_, c_] = A[c_, a_]
    for q in range(p):
        pw2 = pen_w[q] * pen_w[q]
        A[q, q] += pw2
        g[q] += pw2 * (x[q] - prior[q])
    if use_hinges:
        for i in range(erows.shape[1]):
            if erows[cur, i] == 0.0:
                continue
            if sparse:
                n_nz = 0
                for q in range(p):
                    if ejac[cur, i, q] != 0.0:
                        nz[n_nz] = q
                        n_nz += 1
                for ia in range(n_nz):
                    a_ = nz[ia]
                    ea = ejac[cur, i, a_]
                    g[a_] += ea * erows[cur, i]
                    for ic in range(n_nz):
                        A[a_, nz[ic]] += ea * ejac[cur, i, nz[ic]]
                continue
            for a_ in range(p):
                ea = ejac[cur, i, a_]
                g[a_] += ea * erows[cur, i]
                for c_ in range(p):
                    A[a_, c_] += ea * ejac[cur, i, c_]


@njit(cache=True, nogil=True, error_model="numpy")
def _step(
    x: FloatArray,
    A: FloatArray,
    g: FloatArray,
    mu: float,
    lower: FloatArray,
    upper: FloatArray,
    work: tuple[FloatArray, FloatArray, FloatArray],
    x_new: FloatArray,
    frozen: int,
) -> tuple[float, float]:
    """The damped Gauss-Newton step ``(A + mu diag(A)) d = -g`` projected on the bounds into
    ``x_new`` (entries from ``frozen`` on kept: the spline's knot map); returns (largest
    relative move, the model's predicted cost reduction)."""
    Ad, rhs, step = work
    p = x.shape[0]
    dmax = 0.0
    for q in range(p):
        dmax = max(dmax, A[q, q])
    for a_ in range(p):
        rhs[a_] = -g[a_]
        for c_ in range(p):
            Ad[a_, c_] = A[a_, c_]
        Ad[a_, a_] += mu * (A[a_, a_] + 1e-12 * (1.0 + dmax))
    if not _solve_small(Ad, rhs, step):
        for q in range(p):
            step[q] = -g[q] / max(A[q, q] * (1.0 + mu), 1e-300)
    for q in range(p):
        x_new[q] = min(max(x[q] + step[q], lower[q]), upper[q]) if q < frozen else x[q]
    moved = 0.0
    predicted = 0.0
    for q in range(p):
        dq = x_new[q] - x[q]
        moved = max(moved, abs(dq) / (abs(x[q]) + 1e-8))
        predicted -= g[q] * dq
        for c_ in range(p):
            predicted -= 0.5 * dq * A[q, c_] * (x_new[c_] - x[c_])
    return moved, predicted


@njit(cache=True, nogil=True, error_model="numpy")
def _iterate(
    model: ModelArgs,
    x: FloatArray,
    x_new: FloatArray,
    lo: int,
    hi: int,
    quotes: Quotes,
    penalty: Penalty,
    hinge: Hinge,
    scratch: Scratch,
    bufs: Buffers,
    bounds: tuple[FloatArray, FloatArray],
    work: tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, IntArray],
    dc: float,
    pc: float,
    max_iter: int,
    tols: tuple[float, float, int, float],
    geo: Geometry,
) -> tuple[FloatArray, int, float, float, bool, int, int]:
    """Levenberg-Marquardt on one slice from ``x`` (evaluated in slot 0: cost ``dc + pc``):
    accept a step when the cost falls (flip the buffers' slot), damp more when not; stop on
    a small reduction (actual or predicted), a small move, ``mu`` past ``MU_MAX``, or a stall:
    ``stall_iters`` iterations that bought less than ``stall_rtol`` of the cost (``lm``'s
    ``STALL_ITERS``, ``STALL_RTOL``; a warm refit's own, ``WARM_STALL_*``). Returns (x, slot,
    dc, pc, converged, evaluations, iterations)."""
    A, g, Ad, rhs, step, nz = work
    ftol, xtol, stall_iters, stall_rtol = tols
    sparse = model[0] == KERNEL_SPLINE
    frozen = SPLINE_NC + 2 if sparse else x.shape[0]
    mu = MU_INIT
    checkpoint = dc + pc
    cur = 0
    evals = 1
    done = False
    it = 0
    for it in range(1, max_iter + 1):
        _normal_equations(
            x, lo, hi, quotes[3], penalty[0], penalty[1], hinge[0], bufs, cur, A, g, sparse, nz
        )
        moved, predicted = _step(x, A, g, mu, bounds[0], bounds[1], (Ad, rhs, step), x_new, frozen)
        dc_n, pc_n = _evaluate(
            model, x_new, lo, hi, quotes, penalty, hinge, scratch, bufs, 1 - cur, geo
        )
        evals += 1
        old_total = dc + pc
        new_total = dc_n + pc_n
        accept = new_total < old_total
        scale = max(old_total, 1e-300)
        small = (
            (accept and (old_total - new_total) <= ftol * scale)
            or predicted <= ftol * scale
            or moved <= xtol
        )
        if accept:
            x, x_new = x_new, x
            cur = 1 - cur
            dc, pc = dc_n, pc_n
            mu = max(mu / 3.0, 1e-12)
        else:
            mu *= 4.0
        if small or mu > MU_MAX:
            done = True
        elif it % stall_iters == 0:
            now_total = dc + pc
            if checkpoint - now_total <= stall_rtol * max(now_total, 1e-300):
                done = True
            checkpoint = now_total
        if done:
            break
    return x, cur, dc, pc, done, evals, it


@njit(cache=True, nogil=True, error_model="numpy")
def _buffers(n: int, p: int, m_rows: int) -> Buffers:
    """Per evaluation: IVs, gradients, residuals, loss derivatives, band slopes (per quote),
    hinge rows and their gradients, each in two slots (the current point and the trial
    point): accepting a step flips the slot instead of copying."""
    return (
        np.empty((2, n)),
        np.empty((2, n, p)),
        np.empty((2, n)),
        np.empty((2, n)),
        np.empty((2, n)),
        np.zeros((2, m_rows)),
        np.zeros((2, m_rows, p)),
    )


# the spline's knot-map geometry per slice position, kept between runs (``geometry_cache``):
# each slice's knot map (s, yl, yr) it was built under, then ``spline_geometry``'s kh, hw, h1,
# h2, rough for it
GeometryCache = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]


def geometry_cache(n_slices: int, spline: bool) -> GeometryCache:
    """An empty ``GeometryCache`` for ``n_slices`` slices (no slice valid yet); ``spline``
    False: one that holds nothing (other models have no fixed geometry)."""
    S, nh, nr = (n_slices, SPLINE_HINGE_GRID, SPLINE_NC) if spline else (0, 0, 0)
    p = SPLINE_NC + 5
    return (
        np.full((S, 3), np.nan),
        np.zeros((S, nh)),
        np.zeros((S, nh, p)),
        np.zeros((S, nh, p)),
        np.zeros((S, nh, p)),
        np.zeros((S, nr, p)),
    )


@njit(cache=True, nogil=True, error_model="numpy")
def fit_slices(
    kind: int,
    arg: float,
    X0: FloatArray,
    active: np.ndarray,
    k: FloatArray,
    T: FloatArray,
    target: FloatArray,
    weight: FloatArray,
    band: FloatArray,
    kappa: float,
    loss: int,
    f_scale: float,
    starts: np.ndarray,
    lower: FloatArray,
    upper: FloatArray,
    prior: FloatArray,
    pen_w: FloatArray,
    use_hinges: bool,
    inner: FloatArray,
    outer: FloatArray,
    kcal: FloatArray,
    slice_T: FloatArray,
    max_iter: int,
    ftol: float,
    xtol: float,
    stall_iters: int = STALL_ITERS,
    stall_rtol: float = STALL_RTOL,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, np.ndarray, int, int]:
    """``fit_slices_cached`` without a geometry kept between runs."""
    p = X0.shape[1]
    none = (
        np.zeros((0, 3)), np.zeros((0, 0)), np.zeros((0, 0, p)), np.zeros((0, 0, p)),
        np.zeros((0, 0, p)), np.zeros((0, 0, p)),
    )  # fmt: skip
    return fit_slices_cached(
        kind, arg, X0, active, k, T, target, weight, band, kappa, loss, f_scale, starts, lower,
        upper, prior, pen_w, use_hinges, inner, outer, kcal, slice_T, max_iter, ftol, xtol,
        stall_iters, stall_rtol, none,
    )  # fmt: skip


@njit(cache=True, nogil=True, error_model="numpy")
def fit_slices_cached(
    kind: int,
    arg: float,
    X0: FloatArray,
    active: np.ndarray,
    k: FloatArray,
    T: FloatArray,
    target: FloatArray,
    weight: FloatArray,
    band: FloatArray,
    kappa: float,
    loss: int,
    f_scale: float,
    starts: np.ndarray,
    lower: FloatArray,
    upper: FloatArray,
    prior: FloatArray,
    pen_w: FloatArray,
    use_hinges: bool,
    inner: FloatArray,
    outer: FloatArray,
    kcal: FloatArray,
    slice_T: FloatArray,
    max_iter: int,
    ftol: float,
    xtol: float,
    stall_iters: int,
    stall_rtol: float,
    cache: GeometryCache,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, np.ndarray, int, int]:
    """Fit every active slice, shortest first; returns ``(X, iv, data_cost, penalty,
    converged, nfev, iterations)`` as ``lm.solve``'s ``LMResult`` (``penalty`` includes the
    hinge rows).

    ``band`` is empty for the plain objective; ``pen_w`` rows of zeros mean no penalty;
    ``inner``/``outer``/``kcal`` are the per-slice hinge grids (``constraints.hinge_grids``).
    ``cache`` (``geometry_cache``, the spline): slice ``b``'s hinge geometry is rebuilt only
    when its knot map differs from the one the cache holds for position ``b`` (a warm refit
    of the same expiries keeps every knot map; a cache of another size: none kept).
    """
    S, p = X0.shape
    n = k.shape[0]
    X = np.empty((S, p))
    iv_out = np.empty(n)
    if kind == KERNEL_SPLINE:
        m_rows = SPLINE_HINGE_ROWS + kcal.shape[1]
    else:
        m_rows = (inner.shape[1] - 2) + (outer.shape[1] - 2) + kcal.shape[1]
    bufs = _buffers(n, p, m_rows)
    G = max(inner.shape[1], outer.shape[1], kcal.shape[1])
    kv = np.zeros(8)
    scratch = (np.empty(G), np.empty((G, p)), np.empty((SCRATCH_ROWS, max(p, SPLINE_HINGE_BF))), kv)
    w_prev = np.empty(kcal.shape[1])
    k_cal = np.empty(kcal.shape[1])
    model = (kind, arg, kappa, loss, f_scale * f_scale)
    quotes = (k, T, target, weight, band)
    data_cost = np.empty(S)
    pen = np.empty(S)
    converged = np.zeros(S, dtype=np.bool_)
    work = (
        np.empty((p, p)), np.empty(p), np.empty((p, p)), np.empty(p), np.empty(p),
        np.empty(p, dtype=np.int64),
    )  # fmt: skip
    x0 = np.empty(p)
    x1 = np.empty(p)
    spline = kind == KERNEL_SPLINE
    ns, nh, nr = (n, SPLINE_HINGE_GRID, SPLINE_NC) if spline else (0, 0, 0)
    keys, c_kh, c_hw, c_h1, c_h2, c_rough = cache
    if not (spline and keys.shape[0] == S and c_hw.shape[2] == p):  # nothing kept: this run's
        keys = np.full((S, 3), np.nan)
        c_kh = np.zeros((S, nh))
        c_hw = np.zeros((S, nh, p))
        c_h1 = np.zeros((S, nh, p))
        c_h2 = np.zeros((S, nh, p))
        c_rough = np.zeros((S, nr, p))
    design = np.zeros((ns, p))
    d_cal = np.zeros((kcal.shape[1] if spline else 0, p))
    nfev = 0
    iterations = 0
    for b in range(S):
        lo = starts[b]
        hi = starts[b + 1] if b + 1 < S else n
        for q in range(p):
            x0[q] = min(max(X0[b, q], lower[b, q]), upper[b, q])
        has_prev = b > 0
        if use_hinges and has_prev:
            _neighbour(kind, arg, X[b - 1], slice_T[b - 1], kcal[b], k_cal, w_prev, work[4])
        geo = (design, c_kh[b], c_hw[b], c_h1[b], c_h2[b], c_rough[b], d_cal)
        if spline:  # the knot map is frozen: this run's design rows and knot constants, once
            kn = spline_knots(x0)
            for q in range(8):
                kv[q] = kn[q]
            spline_design(x0, k[lo:hi], design[lo:hi])
            ks, kyl, kyr = x0[SPLINE_I_S], x0[SPLINE_I_S + 1], x0[SPLINE_I_S + 2]
            if not (keys[b, 0] == ks and keys[b, 1] == kyl and keys[b, 2] == kyr):
                spline_geometry(x0, geo[1], geo[2], geo[3], geo[4], geo[5])
                keys[b, 0], keys[b, 1], keys[b, 2] = ks, kyl, kyr
            if use_hinges and has_prev:
                spline_design(x0, k_cal, d_cal)
        penalty = (prior[b], pen_w[b])
        hinge = (use_hinges, has_prev, slice_T[b], w_prev, inner[b], outer[b], k_cal)
        dc, pc = _evaluate(model, x0, lo, hi, quotes, penalty, hinge, scratch, bufs, 0, geo)
        if not active[b]:
            X[b] = x0
            iv_out[lo:hi] = bufs[0][0, lo:hi]
            data_cost[b] = dc
            pen[b] = pc
            converged[b] = True
            continue
        x, cur, dc, pc, done, evals, it = _iterate(
            model, x0, x1, lo, hi, quotes, penalty, hinge, scratch, bufs,
            (lower[b], upper[b]), work, dc, pc, max_iter,
            (ftol, xtol, stall_iters, stall_rtol), geo,
        )  # fmt: skip
        X[b] = x
        iv_out[lo:hi] = bufs[0][cur, lo:hi]
        data_cost[b] = dc
        pen[b] = pc
        converged[b] = done
        nfev = max(nfev, evals)
        iterations = max(iterations, it)
    return X, iv_out, data_cost, pen, converged, nfev, iterations


@dataclass(frozen=True)
class SliceProblem:
    """One per-expiry problem for ``fit_slices``: the quotes, objective, bounds and hinge
    grids, fixed; ``solve`` runs it from a start with a prior and penalty weights."""

    kind: int
    arg: float
    k: FloatArray
    T: FloatArray
    target: FloatArray
    weight: FloatArray
    band: FloatArray  # empty: the plain objective
    kappa: float
    loss: int  # LOSS_CODES
    f_scale: float
    starts: IntArray
    lower: FloatArray
    upper: FloatArray
    hinges: bool
    inner: FloatArray
    outer: FloatArray
    kcal: FloatArray
    slice_T: FloatArray
    ftol: float = FTOL
    xtol: float = XTOL
    # the spline's hinge geometry kept between runs (``geometry_cache``; None: rebuilt per run)
    cache: GeometryCache | None = None

    def solve(
        self,
        x0: FloatArray,
        prior: FloatArray,
        pen_w: FloatArray,
        active: npt.NDArray[np.bool_],
        max_iter: int,
        stall: tuple[int, float] = (STALL_ITERS, STALL_RTOL),
    ) -> LMResult:
        """Fit the active slices from ``x0`` (others keep their start); ``stall``: stop a
        slice when that many iterations bought less than that share of its cost."""
        cache = self.cache if self.cache is not None else _NO_CACHE
        X, iv, cost, pen, conv, nfev, iters = fit_slices_cached(
            self.kind, self.arg, np.ascontiguousarray(x0, dtype=np.float64), active,
            self.k, self.T, self.target, self.weight, self.band, self.kappa, self.loss,
            self.f_scale, self.starts, self.lower, self.upper, prior, pen_w, self.hinges,
            self.inner, self.outer, self.kcal, self.slice_T, max_iter, self.ftol, self.xtol,
            int(stall[0]), float(stall[1]), cache,
        )  # fmt: skip
        return LMResult(X, iv, cost, pen, conv, int(nfev), int(iters))


_NO_CACHE = geometry_cache(0, False)
