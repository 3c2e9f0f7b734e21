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

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from streamer.book.snapshot import ChainSnapshot
from streamer.models.base import FitData
from streamer.pricing import black_greeks, implied_vol

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
    idx = _price_filters(q, cfg, drops)
    idx, iv_bid, iv_ask = _iv_filters(q, idx, cfg, drops)
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


def _price_filters(q: _Quotes, cfg: FilterConfig, drops: Counter[str]) -> IntArray:
    """Quotes long enough to expiry, two-sided, not crossed, out of the money (if asked)."""
    snap = q.snap
    keep = np.ones(snap.n_quotes, dtype=np.bool_)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k_all = np.log(snap.strike / q.F)
    sane = np.isfinite(q.F) & (q.F > 0) & (np.abs(k_all) <= MAX_ABS_LOG_MONEYNESS)
    _drop(keep, ~sane, "bad_forward", drops)
    _drop(keep, ~(cfg.min_T_days <= snap.T * 365.0), "short_expiry", drops)
    has_bid_px = np.isfinite(q.bid_usd) & (q.bid_usd > 0)
    has_ask_px = np.isfinite(q.ask_usd) & (q.ask_usd > 0)
    # where a venue sends IVs but no prices (Tardis cuts), its IVs stand in for the prices
    has_bid = has_bid_px | (np.isfinite(snap.bid_iv) & (snap.bid_iv > 0))
    has_ask = has_ask_px | (np.isfinite(snap.ask_iv) & (snap.ask_iv > 0))
    _drop(keep, ~(has_bid & has_ask), "one_sided", drops)
    _drop(keep, has_bid_px & has_ask_px & (q.bid_usd > q.ask_usd), "crossed", drops)
    if cfg.otm_only:
        _drop(keep, np.where(snap.is_call, k_all < 0.0, k_all >= 0.0), "itm", drops)
    return np.flatnonzero(keep)


def _iv_filters(
    q: _Quotes, idx: IntArray, cfg: FilterConfig, drops: Counter[str]
) -> tuple[IntArray, FloatArray, FloatArray]:
    """Bid and ask IVs of the quotes ``idx`` (implied from the prices, else the venue's);
    drops those without IVs, crossed or too wide in IV, or outside the delta band."""
    snap = q.snap
    Fi, Ki, Ti, ci = q.F[idx], snap.strike[idx], snap.T[idx], snap.is_call[idx]
    n = len(idx)
    bid_px, ask_px = q.bid_usd[idx], q.ask_usd[idx]
    # both sides in one call (the inversion is per quote; one call saves the wrapper's work)
    both = np.asarray(
        implied_vol(
            np.concatenate([bid_px, ask_px]),
            np.concatenate([Fi, Fi]),
            np.concatenate([Ki, Ki]),
            np.concatenate([Ti, Ti]),
            np.concatenate([ci, ci]),
        ),
        dtype=np.float64,
    )
    iv_bid = np.where(np.isfinite(bid_px) & (bid_px > 0), both[:n], snap.bid_iv[idx])
    iv_ask = np.where(np.isfinite(ask_px) & (ask_px > 0), both[n:], snap.ask_iv[idx])
    sub = np.ones(n, dtype=np.bool_)
    _drop(sub, ~(np.isfinite(iv_bid) & np.isfinite(iv_ask)), "no_iv", drops)
    _drop(sub, iv_bid > iv_ask, "crossed", drops)
    spread = iv_ask - iv_bid
    wide = np.where(np.isnan(spread), np.inf, spread) > cfg.max_spread_iv
    _drop(sub, wide, "wide_spread", drops)
    # |Black delta| lies in [0, 1] (NaN is never dropped): a band [0, 1] drops nothing
    if cfg.min_abs_delta > 0.0 or cfg.max_abs_delta < 1.0:
        mid_iv = 0.5 * (iv_bid + iv_ask)
        ad = np.abs(np.asarray(black_greeks(Fi, Ki, Ti, np.where(sub, mid_iv, 0.5), ci).delta))
        _drop(sub, (ad < cfg.min_abs_delta) | (ad > cfg.max_abs_delta), "delta_band", drops)
    return idx[sub], iv_bid[sub], iv_ask[sub]


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
    K = snap.strike
    exp_idx = snap.expiry_idx[idx]
    counts = np.bincount(exp_idx, minlength=snap.n_expiries)
    thin = counts < min_quotes
    thin_pts = thin[exp_idx]
    if thin_pts.any():
        drops["thin_slice"] += int(thin_pts.sum())
    live = ~thin_pts
    idx, iv_bid, iv_ask, exp_idx = idx[live], iv_bid[live], iv_ask[live], exp_idx[live]
    order = np.lexsort((K[idx], snap.expiry_ms[exp_idx]))
    idx, iv_bid, iv_ask, exp_idx = idx[order], iv_bid[order], iv_ask[order], exp_idx[order]
    slices = np.flatnonzero(~thin & (counts > 0))
    slices = slices[np.argsort(snap.expiry_ms[slices], kind="stable")]
    remap = np.full(snap.n_expiries, -1, dtype=np.int64)
    remap[slices] = np.arange(len(slices))
    half = 0.5 * (iv_ask - iv_bid)
    data = FitData(
        k=np.log(K[idx] / q.F[idx]),
        T=snap.T[idx].astype(np.float64),
        slice_idx=remap[exp_idx].astype(np.int64),
        iv=0.5 * (iv_bid + iv_ask),
        iv_bid=iv_bid,
        iv_ask=iv_ask,
        weight=1.0 / np.maximum(half, cfg.iv_floor),
        is_call=snap.is_call[idx].astype(np.bool_),
        slice_T=_expiry_years(snap)[slices],
        slice_forward=snap.forwards[slices].astype(np.float64),
        slice_expiry=tuple(snap.expiries[s] for s in slices),
    )
    return Prepared(
        data=data,
        quote_index=idx.astype(np.int64),
        expiry_ms=snap.expiry_ms[slices].astype(np.int64),
        drops=drops,
        listed_k=_listed_k(snap, slices),
    )


def _listed_k(snapshot: ChainSnapshot, slices: IntArray) -> FloatArray:
    """``(S, 2)``: per slice (snapshot expiries ``slices``), the lowest and highest
    ``ln(K / F)`` of its listed strikes (``Prepared.listed_k``)."""
    listing = snapshot.listing
    codes = listing.expiries if listing is not None else snapshot.expiries
    strike = listing.strike if listing is not None else snapshot.strike
    exp_idx = listing.expiry_idx if listing is not None else snapshot.expiry_idx
    # per listed expiry its lowest and highest usable strike (ln(K/F) is monotone in K)
    n_codes = len(codes)
    ok = np.isfinite(strike) & (strike > 0)
    k_lo = np.full(n_codes + 1, np.inf)
    k_hi = np.full(n_codes + 1, -np.inf)
    np.minimum.at(k_lo, exp_idx[ok], strike[ok])
    np.maximum.at(k_hi, exp_idx[ok], strike[ok])
    where = {c: i for i, c in enumerate(codes)}
    at = np.array(
        [where.get(snapshot.expiries[s], n_codes) for s in slices.tolist()], dtype=np.int64
    )
    F = snapshot.forwards[slices].astype(np.float64) if len(slices) else np.zeros(0)
    lo, hi = k_lo[at], k_hi[at]
    good = np.isfinite(lo) & np.isfinite(F) & (F > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.column_stack([np.log(lo / F), np.log(hi / F)])
    out[~good] = np.nan
    return out


def _expiry_years(snapshot: ChainSnapshot) -> FloatArray:
    """Per expiry of the snapshot: the longest ``T`` among its quotes (NaN without quotes)."""
    out = np.full(snapshot.n_expiries, -np.inf)
    np.maximum.at(out, snapshot.expiry_idx, snapshot.T.astype(np.float64))
    return np.where(np.isfinite(out), out, np.nan)


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
