"""The row-by-row part of ``Book.snapshot``, compiled: the quote filters, the forwards per
expiry and the below-intrinsic test in two passes over the live rows instead of some sixty
numpy calls of a few microseconds each on a ~700-row chain (the snapshot is taken on the
daemon's event loop at every trigger).

Each function is the numpy expression it replaces, row for row (``tests/test_book.py``
checks the kernels against those expressions on random messy rows and on real books): a
quote is dropped for the first reason that applies, in ``book.DROP_REASONS``' order; the
comparisons are the same IEEE comparisons (a NaN fails every one of them).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from numba import njit

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

KEPT = -1  # ``reason`` of a row no filter dropped
# ``reason`` codes: indexes into ``book.DROP_REASONS``
NO_QUOTE, BAD_TIMESTAMP, EXPIRING, STALE, ZERO, EMPTY, CROSSED, WIDE_SPREAD = range(8)
NO_FORWARD, BELOW_INTRINSIC = 8, 9
N_REASONS = 10


@njit(cache=True, nogil=True)
def filter_rows(
    q: FloatArray,
    prev_ts: FloatArray,
    exp_ms: IntArray,
    exp_id: IntArray,
    strike: FloatArray,
    cols: IntArray,
    min_ts: float,
    max_ts: float,
    ts_hi: float,
    now_ms: int,
    stale_before: float,
    max_spread_iv: float,
    ratio_max: float,
    reason: IntArray,
    has_bid: BoolArray,
    has_ask: BoolArray,
    good_fwd: BoolArray,
) -> int:
    """The filters up to the forwards: ``reason`` per row (``KEPT`` or the first that
    applies of no_quote .. wide_spread), ``has_bid``/``has_ask`` (a side counts as quoted by
    its price, or by its IV where the venue sends IVs only: the hourly Tardis cuts, OKX's
    greeks-only quotes), ``good_fwd`` (fresh, its forward within ``ratio_max`` of its strike
    either way); returns the bad timestamps not seen by the previous snapshot (``prev_ts``
    differs).

    ``cols``: the columns ts, bid, ask, bid IV, ask IV, forward of ``q``."""
    c_ts, c_bid, c_ask, c_biv, c_aiv, c_fwd = cols[0], cols[1], cols[2], cols[3], cols[4], cols[5]
    new_bad = 0
    for i in range(q.shape[0]):
        ts, bid, ask = q[i, c_ts], q[i, c_bid], q[i, c_ask]
        biv, aiv = q[i, c_biv], q[i, c_aiv]
        hb = not math.isnan(bid) or biv > 0.0
        ha = not math.isnan(ask) or aiv > 0.0
        has_bid[i], has_ask[i] = hb, ha
        r = KEPT
        if math.isnan(ts):
            r = NO_QUOTE
        elif not (ts >= min_ts and ts <= max_ts and ts <= ts_hi):
            r = BAD_TIMESTAMP
            if ts != prev_ts[i]:
                new_bad += 1
        elif exp_ms[exp_id[i]] <= now_ms:
            r = EXPIRING
        elif ts < stale_before:
            r = STALE
        fresh = r == KEPT
        if fresh:
            if bid <= 0.0 or ask <= 0.0:
                r = ZERO
            elif not hb and not ha:
                r = EMPTY
            elif bid > ask:
                r = CROSSED
            elif aiv - biv > max_spread_iv:
                r = WIDE_SPREAD
        reason[i] = r
        f, k = q[i, c_fwd], strike[i]
        good_fwd[i] = fresh and f > k / ratio_max and f < k * ratio_max
    return new_bad


@njit(cache=True, nogil=True)
def group_medians(ids: IntArray, values: FloatArray, mask: BoolArray, n_ids: int) -> FloatArray:
    """Median of ``values[mask]`` per id in ``0..n_ids-1`` (NaN for ids without values): the
    middle element, or the mean of the two middle ones as ``0.5 a + 0.5 b`` (no overflow
    near the float maximum)."""
    out = np.full(n_ids, np.nan)
    count = np.zeros(n_ids + 1, dtype=np.int64)
    for i in range(ids.shape[0]):
        if mask[i]:
            count[ids[i] + 1] += 1
    for e in range(n_ids):
        count[e + 1] += count[e]
    fill = count[:n_ids].copy()
    vals = np.empty(count[n_ids])
    for i in range(ids.shape[0]):
        if mask[i]:
            vals[fill[ids[i]]] = values[i]
            fill[ids[i]] += 1
    for e in range(n_ids):
        lo, hi = count[e], count[e + 1]
        m = hi - lo
        if m == 0:
            continue
        part = np.sort(vals[lo:hi])
        out[e] = 0.5 * part[(m - 1) // 2] + 0.5 * part[m // 2]
    return out


@njit(cache=True, nogil=True)
def finish_rows(
    q: FloatArray,
    exp_id: IntArray,
    strike: FloatArray,
    is_call: BoolArray,
    fwd_by_id: FloatArray,
    good_fwd: BoolArray,
    has_bid: BoolArray,
    cols: IntArray,
    inverse: bool,
    intrinsic_rtol: float,
    reason: IntArray,
    forward: FloatArray,
) -> None:
    """The filters after the forwards: no_forward (its expiry has none), below_intrinsic
    (the mid, or the ask of a quote without a bid, under the intrinsic value at the quote's
    own forward, else its expiry's); ``forward`` per row, what the snapshot carries."""
    c_bid, c_ask, c_fwd = cols[1], cols[2], cols[5]
    for i in range(q.shape[0]):
        slice_f = fwd_by_id[exp_id[i]]
        if reason[i] == KEPT and math.isnan(slice_f):
            reason[i] = NO_FORWARD
        f = q[i, c_fwd] if good_fwd[i] else slice_f
        forward[i] = f
        if reason[i] != KEPT:
            continue
        v = f - strike[i] if is_call[i] else strike[i] - f
        intrinsic = v if (v >= 0.0 or math.isnan(v)) else 0.0
        if inverse:
            intrinsic = intrinsic / f
        bid, ask = q[i, c_bid], q[i, c_ask]
        level = 0.5 * (bid + ask) if has_bid[i] else ask
        if level < intrinsic * (1.0 - intrinsic_rtol):
            reason[i] = BELOW_INTRINSIC


@njit(cache=True, nogil=True)
def rows_changed(
    q: FloatArray, prev: FloatArray, keep: BoolArray, included: BoolArray
) -> BoolArray:
    """Rows whose stored fields (all but the time, column 0) differ bit for bit from the
    previous snapshot's, or whose membership (``keep`` against ``included``) changed."""
    n, c = q.shape
    qb = q.view(np.int64)
    pb = prev.view(np.int64)
    out = np.empty(n, dtype=np.bool_)
    for i in range(n):
        diff = keep[i] != included[i]
        if not diff:
            for j in range(1, c):
                if qb[i, j] != pb[i, j]:
                    diff = True
                    break
        out[i] = diff
    return out


def warm_up() -> None:
    """Load (or compile) the kernels: two quotes through each, with the argument layouts
    ``Book.snapshot`` passes (its forwards are a column of the rows: a strided view)
    (``calib.warmup`` calls this before the daemon reports ready, so the first live
    snapshot does not compile them)."""
    q = np.full((2, 11), 0.5)
    ids = np.zeros(2, dtype=np.int64)
    cols = np.arange(6, dtype=np.int64)
    reason = np.empty(2, dtype=np.int64)
    flags = [np.empty(2, dtype=np.bool_) for _ in range(3)]
    filter_rows(
        q, q[:, 0].copy(), ids[:1], ids, np.ones(2), cols, 0.0, 1.0, 1.0, -1, 0.0, 1.0, 10.0,
        reason, *flags,
    )  # fmt: skip
    fwd = group_medians(ids, q[:, 5], flags[2], 1)
    finish_rows(q, ids, np.ones(2), flags[0], fwd, flags[2], flags[0], cols, True, 1e-9,
                reason, np.empty(2))  # fmt: skip
    rows_changed(q, q, flags[0], flags[0])
