"""From a chain snapshot to the calibrator's ``FitData``: quote filters, IVs, weights.

Every quote that does not reach the fit is counted under one reason:

* ``bad_forward``: no usable forward (not finite, not positive, or so far from the strike that
  ``|log(K / F)| > MAX_ABS_LOG_MONEYNESS``: a forward of 0 or 1e308 is a broken quote, not a
  wing), checked before any arithmetic on it;
* ``short_expiry``: T below ``min_T_days`` (or not a number);
* ``one_sided``: a bid or an ask is missing (the fit needs both to weigh the quote);
* ``crossed``: bid above ask;
* ``no_iv``: no implied vol exists for a side (price at or below intrinsic, or above the
  upper bound);
* ``wide_spread``: ask IV - bid IV above ``max_spread_iv``;
* ``itm``: in the money, when only out-of-the-money quotes are fitted (the default: the OTM
  side carries the information; the ITM side adds only its spread);
* ``delta_band``: |Black delta at mid IV| outside ``[min_abs_delta, max_abs_delta]``;
* ``thin_slice``: the expiry has fewer than ``min_quotes_per_slice`` usable quotes.

IVs are computed here from the bid and ask prices (coin prices times the forward for
coin-margined venues) against the expiry's forward, so every venue is treated alike; the target
is the mid of the bid and ask IVs and the weight ``1 / max(half-spread, iv_floor)``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from numba import njit

from streamer.book.snapshot import ChainSnapshot
from streamer.models.base import FitData
from streamer.pricing.greeks import greeks_scalar
from streamer.pricing.implied import LOWER_TABLE, UPPER_TABLE, implied_vol_scalar

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
MAX_ABS_LOG_MONEYNESS = 10.0  # strikes within e**10 (22026x) of the forward either way


@dataclass(frozen=True)
class FilterConfig:
    """Which quotes the calibrator fits (all configurable, see ``config/default.toml``)."""

    otm_only: bool = True
    max_spread_iv: float = 1.0
    min_abs_delta: float = 0.01
    max_abs_delta: float = 0.99
    min_T_days: float = 0.5
    min_quotes_per_slice: int = 0  # 0: the model decides (per-expiry: n_params + 1; else 3)
    iv_floor: float = 0.005  # half-spread floor of the weights, in vol (0.5 vol point)


@dataclass(frozen=True)
class Prepared:
    """``FitData`` plus where each fitted quote came from and what was dropped."""

    data: FitData
    quote_index: IntArray  # position of each fitted quote in the snapshot
    expiry_ms: npt.NDArray[np.int64]  # per slice
    drops: Counter[str] = field(default_factory=Counter)
    # per slice: the log-moneyness range (lowest, highest) of its expiry's listed strikes
    # against the slice forward (the snapshot's ``listing`` where it has one, else its
    # quotes): what the greeks publish, so what the calendar checks must cover; (0, 2):
    # unknown (the quoted range stands in)
    listed_k: FloatArray = field(default_factory=lambda: np.zeros((0, 2)))

    @property
    def expiries(self) -> tuple[str, ...]:
        return self.data.slice_expiry


def prepare(
    snapshot: ChainSnapshot, config: FilterConfig | None = None, min_quotes: int = 3
) -> Prepared:
    """Filter and weigh a snapshot's quotes; slices sorted by expiry, quotes by strike."""
    cfg = config or FilterConfig()
    drops: Counter[str] = Counter()
    q = _Quotes.of(snapshot)
    idx, iv_bid, iv_ask = _filters(q, cfg, drops)
    return _slices(q, idx, iv_bid, iv_ask, cfg, cfg.min_quotes_per_slice or min_quotes, drops)


@dataclass(frozen=True)
class _Quotes:
    """The snapshot's quotes with each one's forward and USD prices."""

    snap: ChainSnapshot
    F: FloatArray  # each quote's own forward, else its expiry's
    bid_usd: FloatArray
    ask_usd: FloatArray

    @classmethod
    def of(cls, snapshot: ChainSnapshot) -> _Quotes:
        n = snapshot.n_quotes
        # each quote against its own forward (the venue computed its IVs that way; quotes of
        # one expiry seen at different times carry different forwards); the slice's otherwise
        F_slice = snapshot.forwards[snapshot.expiry_idx] if n else np.zeros(0)
        fwd = snapshot.forward
        F = np.where(np.isfinite(fwd) & (fwd > 0), fwd, F_slice)
        unit = F if snapshot.inverse else np.ones(n)
        with np.errstate(over="ignore", invalid="ignore"):  # broken forwards: dropped first
            return cls(snapshot, F, snapshot.bid * unit, snapshot.ask * unit)


# drop reasons in the order they are judged (a quote counts under its first); 0: kept
_REASONS = (
    "",
    "bad_forward",
    "short_expiry",
    "one_sided",
    "crossed",
    "itm",
    "no_iv",
    "crossed",
    "wide_spread",
    "delta_band",
)


def _f64(a: npt.ArrayLike) -> FloatArray:
    return np.ascontiguousarray(a, dtype=np.float64)


def _filters(
    q: _Quotes, cfg: FilterConfig, drops: Counter[str]
) -> tuple[IntArray, FloatArray, FloatArray]:
    """The kept quotes' positions and bid and ask IVs (implied from the prices, else the
    venue's); every other quote counted in ``drops`` under the first reason that drops it:
    the price filters (expiry long enough, two-sided, not crossed, out of the money if asked),
    then the IV filters (IVs exist, not crossed or too wide in IV, inside the delta band).

    One compiled pass over the quotes (``_filter_kernel``): the same tests, in the same
    order and arithmetic, as the array expressions it replaces (a dozen numpy calls on
    arrays of a few hundred quotes cost more than the work)."""
    snap = q.snap
    reason, iv_bid, iv_ask = _filter_kernel(
        q.F,
        _f64(snap.strike),
        _f64(snap.T),
        np.ascontiguousarray(snap.is_call, dtype=np.bool_),
        _f64(q.bid_usd),
        _f64(q.ask_usd),
        _f64(snap.bid_iv),
        _f64(snap.ask_iv),
        float(cfg.min_T_days),
        bool(cfg.otm_only),
        float(cfg.max_spread_iv),
        float(cfg.min_abs_delta),
        float(cfg.max_abs_delta),
        # |Black delta| lies in [0, 1] (NaN is never dropped): a band [0, 1] drops nothing
        cfg.min_abs_delta > 0.0 or cfg.max_abs_delta < 1.0,
        LOWER_TABLE,
        UPPER_TABLE,
    )
    counts = np.bincount(reason, minlength=len(_REASONS)).tolist()
    for r in range(1, len(_REASONS)):
        if counts[r]:
            drops[_REASONS[r]] += counts[r]
    idx = np.flatnonzero(reason == 0)
    return idx, iv_bid[idx], iv_ask[idx]


@njit(cache=True, nogil=True)
def _filter_kernel(
    F: np.ndarray,
    K: np.ndarray,
    T: np.ndarray,
    is_call: np.ndarray,
    bid_usd: np.ndarray,
    ask_usd: np.ndarray,
    venue_bid_iv: np.ndarray,
    venue_ask_iv: np.ndarray,
    min_T_days: float,
    otm_only: bool,
    max_spread_iv: float,
    min_abs_delta: float,
    max_abs_delta: float,
    check_delta: bool,
    lower_t: np.ndarray,
    upper_t: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per quote: the code of the first reason that drops it (``_REASONS``; 0: kept) and
    its bid and ask IVs (NaN where not computed)."""
    n = F.shape[0]
    reason = np.zeros(n, dtype=np.int64)
    iv_b = np.full(n, np.nan)
    iv_a = np.full(n, np.nan)
    greeks = np.empty(6)
    for i in range(n):
        f = F[i]
        k = math.log(K[i] / f) if f > 0.0 and math.isfinite(f) else math.nan
        if not (math.isfinite(f) and f > 0.0 and abs(k) <= MAX_ABS_LOG_MONEYNESS):
            reason[i] = 1
            continue
        if not (min_T_days <= T[i] * 365.0):
            reason[i] = 2
            continue
        b, a = bid_usd[i], ask_usd[i]
        bid_px = math.isfinite(b) and b > 0.0
        ask_px = math.isfinite(a) and a > 0.0
        has_bid = bid_px or (math.isfinite(venue_bid_iv[i]) and venue_bid_iv[i] > 0.0)
        has_ask = ask_px or (math.isfinite(venue_ask_iv[i]) and venue_ask_iv[i] > 0.0)
        if not (has_bid and has_ask):
            reason[i] = 3
            continue
        if bid_px and ask_px and b > a:
            reason[i] = 4
            continue
        c = is_call[i]
        if otm_only and (k < 0.0 if c else k >= 0.0):
            reason[i] = 5
            continue
        vb = (
            implied_vol_scalar(b, f, K[i], T[i], c, lower_t, upper_t) if bid_px else venue_bid_iv[i]
        )
        va = (
            implied_vol_scalar(a, f, K[i], T[i], c, lower_t, upper_t) if ask_px else venue_ask_iv[i]
        )
        iv_b[i] = vb
        iv_a[i] = va
        if not (math.isfinite(vb) and math.isfinite(va)):
            reason[i] = 6
            continue
        if vb > va:
            reason[i] = 7
            continue
        if va - vb > max_spread_iv:
            reason[i] = 8
            continue
        if check_delta:
            greeks_scalar(f, K[i], T[i], 0.5 * (vb + va), c, greeks)
            ad = abs(greeks[0])
            if ad < min_abs_delta or ad > max_abs_delta:
                reason[i] = 9
    return reason, iv_b, iv_a


def _slices(
    q: _Quotes,
    idx: IntArray,
    iv_bid: FloatArray,
    iv_ask: FloatArray,
    cfg: FilterConfig,
    min_quotes: int,
    drops: Counter[str],
) -> Prepared:
    """Drop thin expiries; order slices by expiry and quotes by strike; targets, weights."""
    snap = q.snap
    n_thin, sel, slices, slice_idx = _order(
        idx,
        np.ascontiguousarray(snap.expiry_idx, np.int64),
        _f64(snap.strike),
        np.ascontiguousarray(snap.expiry_ms, np.int64),
        snap.n_expiries,
        min_quotes,
    )
    if n_thin:
        drops["thin_slice"] += n_thin
    # (fancy indexing makes fresh arrays: the casts copy only where the dtype differs)
    idx, iv_bid, iv_ask = idx[sel], iv_bid[sel], iv_ask[sel]
    half = 0.5 * (iv_ask - iv_bid)
    data = FitData(
        k=np.log(snap.strike[idx] / q.F[idx]),
        T=snap.T[idx].astype(np.float64, copy=False),
        slice_idx=slice_idx,
        iv=0.5 * (iv_bid + iv_ask),
        iv_bid=iv_bid,
        iv_ask=iv_ask,
        weight=1.0 / np.maximum(half, cfg.iv_floor),
        is_call=snap.is_call[idx].astype(np.bool_, copy=False),
        slice_T=_expiry_years(snap)[slices],
        slice_forward=snap.forwards[slices].astype(np.float64, copy=False),
        slice_expiry=tuple(snap.expiries[s] for s in slices.tolist()),
    )
    return Prepared(
        data=data,
        quote_index=idx.astype(np.int64, copy=False),
        expiry_ms=snap.expiry_ms[slices].astype(np.int64, copy=False),
        drops=drops,
        listed_k=_listed_k(snap, slices),
    )


@njit(cache=True, nogil=True)
def _order(
    idx: np.ndarray,
    expiry_idx: np.ndarray,
    K: np.ndarray,
    expiry_ms: np.ndarray,
    n_expiries: int,
    min_quotes: int,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Of the kept quotes ``idx``: how many sit in thin expiries (fewer than ``min_quotes``),
    the positions (into ``idx``) of the others sorted by expiry time then strike (stable:
    ``np.lexsort((K, expiry_ms))``), the live expiries sorted by time, each sorted quote's
    slice."""
    counts = np.zeros(n_expiries, dtype=np.int64)
    for i in range(idx.shape[0]):
        counts[expiry_idx[idx[i]]] += 1
    n_live = 0
    for i in range(idx.shape[0]):
        if counts[expiry_idx[idx[i]]] >= min_quotes:
            n_live += 1
    n_thin = idx.shape[0] - n_live
    live = np.empty(n_live, dtype=np.int64)
    key_k = np.empty(n_live)
    j = 0
    for i in range(idx.shape[0]):
        if counts[expiry_idx[idx[i]]] >= min_quotes:
            live[j] = i
            key_k[j] = K[idx[i]]
            j += 1
    # least significant key first, each sort stable: the order of np.lexsort
    by_k = live[np.argsort(key_k, kind="mergesort")]
    key_t = np.empty(n_live, dtype=np.int64)
    for j in range(n_live):
        key_t[j] = expiry_ms[expiry_idx[idx[by_k[j]]]]
    sel = by_k[np.argsort(key_t, kind="mergesort")]
    n_s = 0
    for e in range(n_expiries):
        if counts[e] >= min_quotes and counts[e] > 0:
            n_s += 1
    cand = np.empty(n_s, dtype=np.int64)
    cand_t = np.empty(n_s, dtype=np.int64)
    j = 0
    for e in range(n_expiries):
        if counts[e] >= min_quotes and counts[e] > 0:
            cand[j] = e
            cand_t[j] = expiry_ms[e]
            j += 1
    slices = cand[np.argsort(cand_t, kind="mergesort")]
    remap = np.full(n_expiries, -1, dtype=np.int64)
    for j in range(n_s):
        remap[slices[j]] = j
    slice_idx = np.empty(n_live, dtype=np.int64)
    for j in range(n_live):
        slice_idx[j] = remap[expiry_idx[idx[sel[j]]]]
    return n_thin, sel, slices, slice_idx


def _listed_k(snapshot: ChainSnapshot, slices: IntArray) -> FloatArray:
    """``(S, 2)``: per slice (snapshot expiries ``slices``), the lowest and highest
    ``ln(K / F)`` of its listed strikes (``Prepared.listed_k``)."""
    listing = snapshot.listing
    codes = listing.expiries if listing is not None else snapshot.expiries
    strike = listing.strike if listing is not None else snapshot.strike
    exp_idx = listing.expiry_idx if listing is not None else snapshot.expiry_idx
    # per listed expiry its lowest and highest usable strike (ln(K/F) is monotone in K)
    n_codes = len(codes)
    k_lo, k_hi = _strike_range(_f64(strike), np.ascontiguousarray(exp_idx, np.int64), n_codes)
    where = {c: i for i, c in enumerate(codes)}
    at = np.array(
        [where.get(snapshot.expiries[s], n_codes) for s in slices.tolist()], dtype=np.int64
    )
    F = snapshot.forwards[slices].astype(np.float64, copy=False) if len(slices) else np.zeros(0)
    lo, hi = k_lo[at], k_hi[at]
    good = np.isfinite(lo) & np.isfinite(F) & (F > 0)
    out = np.empty((len(at), 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, 0] = np.log(lo / F)
        out[:, 1] = np.log(hi / F)
    if not good.all():
        out[~good] = np.nan
    return out


def _expiry_years(snapshot: ChainSnapshot) -> FloatArray:
    """Per expiry of the snapshot: the longest ``T`` among its quotes (NaN without quotes)."""
    return _longest_t(
        _f64(snapshot.T), np.ascontiguousarray(snapshot.expiry_idx, np.int64), snapshot.n_expiries
    )


@njit(cache=True, nogil=True)
def _strike_range(strike: np.ndarray, exp_idx: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per expiry ``0..n-1`` (and ``n``: none) the lowest and highest finite positive strike
    (``inf`` / ``-inf`` without one)."""
    lo = np.full(n + 1, np.inf)
    hi = np.full(n + 1, -np.inf)
    for i in range(strike.shape[0]):
        x = strike[i]
        if math.isfinite(x) and x > 0.0:
            e = exp_idx[i]
            lo[e] = min(lo[e], x)
            hi[e] = max(hi[e], x)
    return lo, hi


@njit(cache=True, nogil=True)
def _longest_t(T: np.ndarray, exp_idx: np.ndarray, n: int) -> np.ndarray:
    """Per expiry the largest ``T`` of its quotes; NaN without quotes or if one is NaN
    (``np.maximum`` propagates NaN)."""
    out = np.full(n, -np.inf)
    for i in range(T.shape[0]):
        e = exp_idx[i]
        t = T[i]
        if math.isnan(t) or math.isnan(out[e]):
            out[e] = math.nan
        elif t > out[e]:
            out[e] = t
    for e in range(n):
        if not math.isfinite(out[e]):
            out[e] = math.nan
    return out


def _drop(
    keep: npt.NDArray[np.bool_], mask: npt.NDArray[np.bool_], reason: str, drops: Counter[str]
) -> None:
    """Clear ``keep`` in place where ``mask`` holds; count the newly dropped under ``reason``."""
    hit = mask & keep
    c = int(hit.sum())
    if c:
        drops[reason] += c
        keep &= ~hit


def in_band(iv: FloatArray, bid: FloatArray, ask: FloatArray) -> FloatArray:
    """1.0 where a fitted IV lies inside the market's [bid IV, ask IV], else 0.0."""
    return np.asarray(((iv >= bid) & (iv <= ask)).astype(np.float64))
