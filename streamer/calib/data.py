"""From a chain snapshot to the calibrator's ``FitData``: quote filters, IVs, weights.

Every quote that does not reach the fit is counted under one reason:

* ``one_sided``: a bid or an ask is missing (the fit needs both to weigh the quote);
* ``crossed``: bid above ask;
* ``no_iv``: no implied vol exists for a side (price at or below intrinsic, or above the
  upper bound);
* ``wide_spread``: ask IV - bid IV above ``max_spread_iv``;
* ``itm``: in the money, when only out-of-the-money quotes are fitted (the default: the OTM
  side carries the information; the ITM side adds only its spread);
* ``delta_band``: |Black delta at mid IV| outside ``[min_abs_delta, max_abs_delta]``;
* ``short_expiry``: T below ``min_T_days``;
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

    @property
    def expiries(self) -> tuple[str, ...]:
        return self.data.slice_expiry


def prepare(
    snapshot: ChainSnapshot, config: FilterConfig | None = None, min_quotes: int = 3
) -> Prepared:
    """Filter and weigh a snapshot's quotes; slices sorted by expiry, quotes by strike."""
    cfg = config or FilterConfig()
    drops: Counter[str] = Counter()
    n = snapshot.n_quotes
    # each quote against its own forward (the venue computed its IVs that way; quotes of one
    # expiry seen at different times carry different forwards); the slice's forward otherwise
    F_slice = snapshot.forwards[snapshot.expiry_idx] if n else np.zeros(0)
    F = np.where(np.isfinite(snapshot.forward) & (snapshot.forward > 0), snapshot.forward, F_slice)
    K, T, is_call = snapshot.strike, snapshot.T, snapshot.is_call
    unit = F if snapshot.inverse else np.ones(n)
    bid_usd, ask_usd = snapshot.bid * unit, snapshot.ask * unit

    keep = np.ones(n, dtype=np.bool_)

    def drop(mask: npt.NDArray[np.bool_], reason: str) -> None:
        _drop(keep, mask, reason, drops)

    drop(cfg.min_T_days > T * 365.0, "short_expiry")
    has_bid_px = np.isfinite(bid_usd) & (bid_usd > 0)
    has_ask_px = np.isfinite(ask_usd) & (ask_usd > 0)
    # where a venue sends IVs but no prices (Tardis cuts), its IVs stand in for the prices
    has_bid = has_bid_px | (np.isfinite(snapshot.bid_iv) & (snapshot.bid_iv > 0))
    has_ask = has_ask_px | (np.isfinite(snapshot.ask_iv) & (snapshot.ask_iv > 0))
    drop(~(has_bid & has_ask), "one_sided")
    drop(has_bid_px & has_ask_px & (bid_usd > ask_usd), "crossed")
    if cfg.otm_only:
        k_all = np.log(K / F)
        drop(np.where(is_call, k_all < 0.0, k_all >= 0.0), "itm")
    idx = np.flatnonzero(keep)
    Fi, Ki, Ti, ci = F[idx], K[idx], T[idx], is_call[idx]
    iv_bid = np.asarray(implied_vol(bid_usd[idx], Fi, Ki, Ti, ci), dtype=np.float64)
    iv_ask = np.asarray(implied_vol(ask_usd[idx], Fi, Ki, Ti, ci), dtype=np.float64)
    iv_bid = np.where(has_bid_px[idx], iv_bid, snapshot.bid_iv[idx])
    iv_ask = np.where(has_ask_px[idx], iv_ask, snapshot.ask_iv[idx])
    ok = np.isfinite(iv_bid) & np.isfinite(iv_ask)
    sub = np.ones(len(idx), dtype=np.bool_)

    def drop_sub(mask: npt.NDArray[np.bool_], reason: str) -> None:
        _drop(sub, mask, reason, drops)

    drop_sub(~ok, "no_iv")
    drop_sub(iv_bid > iv_ask, "crossed")
    drop_sub(np.nan_to_num(iv_ask - iv_bid, nan=np.inf) > cfg.max_spread_iv, "wide_spread")
    mid_iv = 0.5 * (iv_bid + iv_ask)
    delta = np.asarray(black_greeks(Fi, Ki, Ti, np.where(sub, mid_iv, 0.5), ci).delta)
    ad = np.abs(delta)
    drop_sub((ad < cfg.min_abs_delta) | (ad > cfg.max_abs_delta), "delta_band")

    idx, iv_bid, iv_ask, mid_iv = idx[sub], iv_bid[sub], iv_ask[sub], mid_iv[sub]
    exp_idx = snapshot.expiry_idx[idx]
    counts = np.bincount(exp_idx, minlength=snapshot.n_expiries)
    thin = counts < (cfg.min_quotes_per_slice or min_quotes)
    thin_pts = thin[exp_idx]
    if thin_pts.any():
        drops["thin_slice"] += int(thin_pts.sum())
    live = ~thin_pts
    idx, iv_bid, iv_ask, mid_iv, exp_idx = (
        idx[live],
        iv_bid[live],
        iv_ask[live],
        mid_iv[live],
        exp_idx[live],
    )
    slices = np.flatnonzero(~thin & (counts > 0))
    order = np.lexsort((K[idx], snapshot.expiry_ms[exp_idx]))
    idx, iv_bid, iv_ask, mid_iv, exp_idx = (
        idx[order],
        iv_bid[order],
        iv_ask[order],
        mid_iv[order],
        exp_idx[order],
    )
    slices = slices[np.argsort(snapshot.expiry_ms[slices], kind="stable")]
    remap = np.full(snapshot.n_expiries, -1, dtype=np.int64)
    remap[slices] = np.arange(len(slices))
    slice_idx = remap[exp_idx]
    half = 0.5 * (iv_ask - iv_bid)
    Fq = F[idx]
    data = FitData(
        k=np.log(K[idx] / Fq),
        T=T[idx].astype(np.float64),
        slice_idx=slice_idx.astype(np.int64),
        iv=mid_iv,
        iv_bid=iv_bid,
        iv_ask=iv_ask,
        weight=1.0 / np.maximum(half, cfg.iv_floor),
        is_call=is_call[idx].astype(np.bool_),
        slice_T=_expiry_years(snapshot)[slices],
        slice_forward=snapshot.forwards[slices].astype(np.float64),
        slice_expiry=tuple(snapshot.expiries[s] for s in slices),
    )
    return Prepared(
        data=data,
        quote_index=idx.astype(np.int64),
        expiry_ms=snapshot.expiry_ms[slices].astype(np.int64),
        drops=drops,
    )


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
