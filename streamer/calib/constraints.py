"""No-arbitrage hinge rows for per-expiry models, inside the Levenberg-Marquardt fit.

For every slice ``j`` (parameters ``x_j``, maturity ``T_j``) on a grid ``k_j`` of ``G``
log-moneyness points scaled to the slice (``+-6`` ATM standard deviations, within ``+-3``):

* butterfly (Gatheral & Jacquier 2014, Lemma 2.2)::

      g(k) = (1 - k w'/(2w))^2 - w'^2/4 (1/w + 1/4) + w''/2 >= margin

  with ``w = iv^2 T`` and ``w'``, ``w''`` central differences on the grid; row
  ``mu_bf * max(0, margin - g)``, its Jacobian by the chain rule through ``dw/dx``;
* calendar: ``w_j(k) >= w_{j-1}(k)`` where both slices publish IVs (``pair_ranges``: the
  common range of their listed strikes, each widened to its quotes; on the neighbour's
  whole-line grid for ``exact_calendar`` models such as eSSVI), with
  the shorter slice taken at its current parameters; row
  ``mu_cal * max(0, w_{j-1} - w_j) / W_SCALE``.

The rows vanish when the constraints hold, so arbitrage-free fits are unchanged; when a
slice would violate them the fit is pulled back inside during the same LM run, and the
scipy repair (``streamer.calib.repair``) is left for the rare leftovers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numba import njit

from streamer.models.base import FitData, FloatArray, Model

G_POINTS = 49
OUTER_POINTS = 61  # the wide grid: +-3 in steps of 0.1
# np.linspace(0, 1, n) of the usual grid sizes, made once (read-only)
_UNIT = {n: np.linspace(0.0, 1.0, n) for n in (G_POINTS, OUTER_POINTS)}
_SYMMETRIC = np.linspace(-1.0, 1.0, G_POINTS)
_RANGES = {n: np.arange(float(n)) for n in (G_POINTS, OUTER_POINTS)}
for _u in (*_UNIT.values(), _SYMMETRIC, *_RANGES.values()):
    _u.flags.writeable = False
MU_BUTTERFLY = 300.0
BUTTERFLY_MARGIN = 5e-3
MU_CALENDAR = 10.0
W_SCALE = 1e-4  # total variance: about 0.1 vol point at one month


def slice_grids(data: FitData, n: int = G_POINTS) -> FloatArray:
    """Per-slice grids ``(S, n)``: +-6 ATM standard deviations (from the slice's mean IV), at
    least +-0.3, at most +-3."""
    S = data.n_slices
    counts = np.bincount(data.slice_idx, minlength=S)
    mean_iv = np.bincount(data.slice_idx, weights=data.iv, minlength=S) / np.maximum(counts, 1)
    sd = np.where(counts > 0, mean_iv * np.sqrt(data.slice_T), 0.5)
    half = np.clip(6.0 * sd, 0.3, 3.0)
    unit = _SYMMETRIC if n == G_POINTS else np.linspace(-1.0, 1.0, n)
    return np.asarray(unit[None, :] * half[:, None])


def slice_ranges(data: FitData, listed: FloatArray | None = None) -> FloatArray:
    """``(S, 2)``: per slice the log-moneyness range the calendar checks must cover: the
    quoted range, widened to the expiry's listed strikes (``Prepared.listed_k``) where
    given and finite (the greeks publish an IV at every listed strike)."""
    S = data.n_slices
    out = np.zeros((S, 2))
    if S == 0:
        return out
    # quotes are sorted by slice (prepare); empty slices would break reduceat
    starts = np.searchsorted(data.slice_idx, np.arange(S))
    out[:, 0] = np.minimum.reduceat(data.k, starts)
    out[:, 1] = np.maximum.reduceat(data.k, starts)
    if listed is not None and listed.shape == (S, 2):
        ok = np.all(np.isfinite(listed), axis=1)
        out[ok, 0] = np.minimum(out[ok, 0], listed[ok, 0])
        out[ok, 1] = np.maximum(out[ok, 1], listed[ok, 1])
    return out


def common_range(ranges: FloatArray, a: int, b: int, margin: float = 0.02) -> tuple[float, float]:
    """The range shared by slices ``a`` and ``b`` (``slice_ranges``) plus ``margin``; at
    the money when they do not overlap."""
    lo = max(float(ranges[a, 0]), float(ranges[b, 0])) - margin
    hi = min(float(ranges[a, 1]), float(ranges[b, 1])) + margin
    return (lo, hi) if lo <= hi else (-margin, margin)


def pair_ranges(
    data: FitData, margin: float = 0.02, listed: FloatArray | None = None
) -> tuple[FloatArray, FloatArray]:
    """Per slice ``j >= 1``: the log-moneyness range shared by slices ``j-1`` and ``j`` (the
    calendar check's); entry 0 is a placeholder.

    Without ``listed``: the intersection of the two quoted ranges (outside it one of the
    two smiles is extrapolated). With ``listed`` (per slice the listed strikes' range,
    ``Prepared.listed_k``): the intersection of the two slices' listed ranges (each widened
    to its quotes), where both expiries publish IVs and a bot may hold either, extrapolated
    smiles included: the independent check of the published IVs
    (``streamer.tools.bench.arbcheck``) compares them there. Where the ranges do not
    overlap, the check runs at the money.
    """
    S = data.n_slices
    if S == 0:
        return np.zeros(0), np.zeros(0)
    use = listed is not None and listed.shape == (S, 2)
    lo, hi = _pair_ranges(
        data.k,
        data.slice_idx,
        S,
        np.ascontiguousarray(listed, dtype=np.float64) if use else np.zeros((0, 2)),
        float(margin),
    )
    return lo, hi


@njit(cache=True, nogil=True)
def _pair_ranges(
    k: np.ndarray, slice_idx: np.ndarray, S: int, listed: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """``pair_ranges`` in one pass (quotes sorted by slice, every slice quoted): each
    slice's quoted range (``slice_ranges``), widened to its listed range where that is
    finite (``listed`` empty: none), then each neighbouring pair's ``common_range``; the
    same comparisons and the same two additions per entry as the array expressions."""
    r_lo = np.full(S, np.inf)
    r_hi = np.full(S, -np.inf)
    for i in range(k.shape[0]):
        j = slice_idx[i]
        r_lo[j] = min(r_lo[j], k[i])
        r_hi[j] = max(r_hi[j], k[i])
    if listed.shape[0] == S:
        for j in range(S):
            a, b = listed[j, 0], listed[j, 1]
            if math.isfinite(a) and math.isfinite(b):
                r_lo[j] = min(r_lo[j], a)
                r_hi[j] = max(r_hi[j], b)
    lo = np.full(S, -margin)
    hi = np.full(S, margin)
    for j in range(1, S):
        lo[j] = max(r_lo[j - 1], r_lo[j]) - margin
        hi[j] = min(r_hi[j - 1], r_hi[j]) + margin
        if lo[j] > hi[j]:
            lo[j], hi[j] = -margin, margin
    return lo, hi


def pair_grids(
    data: FitData,
    n: int,
    listed: FloatArray | None = None,
    pairs: tuple[FloatArray, FloatArray] | None = None,
) -> FloatArray:
    """``(S, n)``: row ``j`` spans ``pair_ranges``' range of slices ``j-1`` and ``j``
    (``pairs``: that range when already computed)."""
    lo, hi = pair_ranges(data, listed=listed) if pairs is None else pairs
    u = _UNIT.get(n)
    if u is None:
        u = np.linspace(0.0, 1.0, n)
    return np.asarray(lo[:, None] + (hi - lo)[:, None] * u[None, :])


def hinge_grids(
    data: FitData,
    listed: FloatArray | None = None,
    pairs: tuple[FloatArray, FloatArray] | None = None,
    butterfly: bool = True,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The hinge rows' grids per slice: butterfly inner (``slice_grids``), butterfly outer
    (+-3 and every quote, ``OUTER_POINTS``), calendar (``pair_grids`` with the listed
    ranges ``listed``, ``G_POINTS``; ``pairs``: ``pair_ranges`` when already computed).
    ``butterfly`` False: empty ``(S, 0)`` butterfly grids (a model with its own butterfly
    rows, the spline, never reads them)."""
    S = data.n_slices
    if not butterfly:
        none = np.zeros((S, 0))
        return none, none, pair_grids(data, G_POINTS, listed, pairs)
    lo = min(-3.0, float(data.k.min()) - 0.1)
    hi = max(3.0, float(data.k.max()) + 0.1)
    outer = np.repeat(linspace(lo, hi, OUTER_POINTS)[None, :], S, axis=0)
    return slice_grids(data), outer, pair_grids(data, G_POINTS, listed, pairs)


def linspace(start: float, stop: float, n: int) -> FloatArray:
    """``np.linspace(start, stop, n)``, the same values (finite, distinct ends; else numpy): the
    steps ``i * (stop - start) / (n - 1) + start`` and ``stop`` itself last, from a range
    made once."""
    u = _RANGES.get(n)
    if u is None or start == stop or not (math.isfinite(start) and math.isfinite(stop)):
        return np.linspace(start, stop, n)
    y = u * ((stop - start) / (n - 1)) + start
    y[-1] = stop
    return np.asarray(y)


def _butterfly(
    block: Callable[[FloatArray, FloatArray, FloatArray], tuple[FloatArray, FloatArray]],
    X: FloatArray,
    k: FloatArray,
    T: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """Butterfly hinge rows and Jacobian on per-slice uniform grids ``k (S, G)``."""
    S, G = k.shape
    p = X.shape[1]
    h = (k[:, 1] - k[:, 0])[:, None]
    kc = k[:, 1:-1]
    TT = np.repeat(T, G)
    iv, jac = block(np.repeat(X, G, axis=0), k.ravel(), TT)
    w = (iv * iv * TT).reshape(S, G)
    dw = ((2.0 * iv * TT)[:, None] * jac).reshape(S, G, p)
    w1 = (w[:, 2:] - w[:, :-2]) / (2.0 * h)
    w2 = (w[:, 2:] - 2.0 * w[:, 1:-1] + w[:, :-2]) / (h * h)
    wc = np.maximum(w[:, 1:-1], 1e-12)
    dw1 = (dw[:, 2:] - dw[:, :-2]) / (2.0 * h)[:, :, None]
    dw2 = (dw[:, 2:] - 2.0 * dw[:, 1:-1] + dw[:, :-2]) / (h * h)[:, :, None]
    a = 1.0 - kc * w1 / (2.0 * wc)
    g = a * a - 0.25 * w1 * w1 * (1.0 / wc + 0.25) + 0.5 * w2
    dg_dwc = a * kc * w1 / (wc * wc) + 0.25 * w1 * w1 / (wc * wc)
    dg_dw1 = -a * kc / wc - 0.5 * w1 * (1.0 / wc + 0.25)
    dg = dg_dwc[:, :, None] * dw[:, 1:-1] + dg_dw1[:, :, None] * dw1 + 0.5 * dw2
    active = g < BUTTERFLY_MARGIN
    rows = np.where(active, MU_BUTTERFLY * (BUTTERFLY_MARGIN - g), 0.0)
    return rows, np.where(active[:, :, None], -MU_BUTTERFLY * dg, 0.0)


def hinge_rows(
    model: Model, data: FitData, listed: FloatArray | None = None
) -> Callable[[FloatArray], tuple[FloatArray, FloatArray]] | None:
    """``X (S, p) -> (rows (S, m), jacobian (S, m, p))`` for a model with ``block_jacobian``.

    Butterfly rows on two grids per slice: a fine one around the money (``slice_grids``) and
    a wide one over +-3 (and every quote), where short-dated wings bend; calendar rows on
    ``pair_ranges`` (with ``listed``: the listed strikes' common range). (Models with a
    compiled kernel get the same rows in ``streamer.calib.kernel``.)
    """
    block = getattr(model, "block_jacobian", None)
    if block is None or not model.per_expiry:
        return None
    iv_only = getattr(model, "iv_rows", None)  # values without derivatives, when offered
    S = data.n_slices
    inner, outer, kcal = hinge_grids(data, listed)
    G = kcal.shape[1]
    T = data.slice_T
    kcal_flat = kcal[1:].ravel()
    TT_cal = np.repeat(T[1:], G)
    TT_prev = np.repeat(T[:-1], G)
    moving_grid = S > 1 and model.exact_calendar

    def extra(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        p = X.shape[1]
        k_flat = kcal_flat
        if moving_grid:  # the model's whole-line grid against each current neighbour
            grids = [model.calendar_grid(X[j - 1], G) for j in range(1, S)]
            k_flat = np.concatenate([g for g in grids if g is not None])
        r_in, j_in = _butterfly(block, X, inner, T)
        r_out, j_out = _butterfly(block, X, outer, T)
        # calendar against the shorter neighbour (taken at its current parameters)
        r_cal = np.zeros((S, G))
        j_cal = np.zeros((S, G, p))
        if S > 1:
            prev_rows = np.repeat(X[:-1], G, axis=0)
            iv_prev = (
                iv_only(prev_rows, k_flat, TT_prev)
                if iv_only is not None
                else block(prev_rows, k_flat, TT_prev)[0]
            )
            iv_j, jac_j = block(np.repeat(X[1:], G, axis=0), k_flat, TT_cal)
            gap = ((iv_prev * iv_prev * TT_prev) - (iv_j * iv_j * TT_cal)).reshape(S - 1, G)
            dwj = ((2.0 * iv_j * TT_cal)[:, None] * jac_j).reshape(S - 1, G, p)
            act = gap > 0.0
            r_cal[1:] = np.where(act, MU_CALENDAR * gap / W_SCALE, 0.0)
            j_cal[1:] = np.where(act[:, :, None], -MU_CALENDAR * dwj / W_SCALE, 0.0)
        rows = np.concatenate([r_in, r_out, r_cal], axis=1)
        return rows, np.concatenate([j_in, j_out, j_cal], axis=1)

    return extra
