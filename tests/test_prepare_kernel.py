"""``prepare``'s compiled quote filter (issue 13, warm refit speed) against a plain per-quote
reference of the rules in ``streamer.calib.data``'s docstring: the same quotes kept, in the
same order, with the same IVs, and every dropped quote counted under its first reason, on a
synthetic chain and on a real one, both with broken forwards, missing or crossed sides,
short expiries and prices outside the no-arbitrage bounds mixed in."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.data import MAX_ABS_LOG_MONEYNESS, FilterConfig, prepare
from streamer.pricing import black_greeks, implied_vol
from streamer.tools.chains import load_chains
from tests.conftest import shared_file
from tests.synth import make_chain, svi_surface

REAL = "snapshots/deribit_options_snapshot_20260105T041127Z.csv"


def reference(
    snap: ChainSnapshot, cfg: FilterConfig
) -> tuple[list[int], list[float], list[float], Counter[str]]:
    """Quote by quote, the documented filters in their documented order (no thin-slice rule:
    the tests ask for ``min_quotes`` 1)."""
    keep: list[int] = []
    bids: list[float] = []
    asks: list[float] = []
    drops: Counter[str] = Counter()
    for i in range(snap.n_quotes):
        f = float(snap.forward[i])
        if not (math.isfinite(f) and f > 0):
            f = float(snap.forwards[snap.expiry_idx[i]])
        K, T, call = float(snap.strike[i]), float(snap.T[i]), bool(snap.is_call[i])
        unit = f if snap.inverse else 1.0
        b, a = float(snap.bid[i]) * unit, float(snap.ask[i]) * unit
        k = math.log(K / f) if f > 0 and math.isfinite(f) and K > 0 else math.nan
        if not (math.isfinite(f) and f > 0 and abs(k) <= MAX_ABS_LOG_MONEYNESS):
            drops["bad_forward"] += 1
            continue
        if not cfg.min_T_days <= T * 365.0:
            drops["short_expiry"] += 1
            continue
        bp, ap = math.isfinite(b) and b > 0, math.isfinite(a) and a > 0
        vb_venue, va_venue = float(snap.bid_iv[i]), float(snap.ask_iv[i])
        has_b = bp or (math.isfinite(vb_venue) and vb_venue > 0)
        has_a = ap or (math.isfinite(va_venue) and va_venue > 0)
        if not (has_b and has_a):
            drops["one_sided"] += 1
            continue
        if bp and ap and b > a:
            drops["crossed"] += 1
            continue
        if cfg.otm_only and ((k < 0) if call else (k >= 0)):
            drops["itm"] += 1
            continue
        vb = float(implied_vol(b, f, K, T, call)) if bp else vb_venue
        va = float(implied_vol(a, f, K, T, call)) if ap else va_venue
        if not (math.isfinite(vb) and math.isfinite(va)):
            drops["no_iv"] += 1
            continue
        if vb > va:
            drops["crossed"] += 1
            continue
        if va - vb > cfg.max_spread_iv:
            drops["wide_spread"] += 1
            continue
        if cfg.min_abs_delta > 0 or cfg.max_abs_delta < 1:
            d = abs(float(black_greeks(f, K, T, 0.5 * (vb + va), call).delta))
            if d < cfg.min_abs_delta or d > cfg.max_abs_delta:
                drops["delta_band"] += 1
                continue
        keep.append(i)
        bids.append(vb)
        asks.append(va)
    return keep, bids, asks, drops


def broken(snap: ChainSnapshot, rng: np.random.Generator) -> ChainSnapshot:
    """``snap`` with about 5 % of each field broken in one of the ways the filters catch."""
    n = snap.n_quotes
    fields = {
        "forward": [np.nan, 0.0, -1.0, 1e308],
        "bid": [np.nan, 0.0, 1e-12, 1e9],  # 1e9: crossed
        "ask": [np.nan, 0.0, 1e9],  # 1e9: above the upper bound, no IV
        "bid_iv": [np.nan, 0.5],
        "T": [np.nan, 0.0, 1e-4],
    }
    out = {}
    for name, bad in fields.items():
        arr = np.array(getattr(snap, name), dtype=np.float64)
        m = rng.random(n) < 0.05
        arr[m] = rng.choice(bad, int(m.sum()))
        out[name] = arr
    return dataclasses.replace(snap, **out)  # type: ignore[arg-type]


CONFIGS = [
    FilterConfig(),
    FilterConfig(otm_only=False, max_spread_iv=0.05, min_abs_delta=0.05, max_abs_delta=0.9),
    FilterConfig(min_T_days=0.0, min_abs_delta=0.0, max_abs_delta=1.0),
]


def check(snap: ChainSnapshot, cfg: FilterConfig) -> None:
    keep, bids, asks, drops = reference(snap, cfg)
    prep = prepare(snap, cfg, 1)
    order = np.lexsort((snap.strike[keep], snap.expiry_ms[snap.expiry_idx[keep]]))
    want = np.asarray(keep, dtype=np.int64)[order]
    np.testing.assert_array_equal(prep.quote_index, want)
    np.testing.assert_array_equal(prep.data.iv_bid, np.asarray(bids)[order])
    np.testing.assert_array_equal(prep.data.iv_ask, np.asarray(asks)[order])
    assert prep.drops == drops


@pytest.mark.parametrize("cfg", CONFIGS)
def test_synthetic_chain_matches_reference(cfg: FilterConfig) -> None:
    rng = np.random.default_rng(3)
    base = make_chain(svi_surface()[1], n_strikes=25)
    for _ in range(4):
        snap = broken(base, rng)
        check(snap, cfg)
    kinds = reference(broken(base, np.random.default_rng(3)), CONFIGS[1])[3]
    assert {"bad_forward", "short_expiry", "one_sided", "crossed", "no_iv"} <= set(
        kinds
    )  # exercised


@pytest.mark.parametrize("cfg", CONFIGS)
def test_real_chain_matches_reference(cfg: FilterConfig) -> None:
    snap = load_chains(shared_file(REAL), "BTC")[0]
    check(snap, cfg)
    check(broken(snap, np.random.default_rng(5)), cfg)


def test_thin_slices_dropped_and_slices_sorted() -> None:
    snap = make_chain(svi_surface()[1], n_strikes=9)
    n_per = np.bincount(prepare(snap, FilterConfig(), 1).data.slice_idx)
    cut = int(np.sort(n_per)[1])  # drops the thinnest expiry (or those tied with it)
    prep = prepare(snap, FilterConfig(), cut)
    full = prepare(snap, FilterConfig(), 1)
    assert prep.drops["thin_slice"] == int(n_per[n_per < cut].sum())
    assert prep.data.n_slices == int((n_per >= cut).sum())
    assert list(prep.expiry_ms) == sorted(prep.expiry_ms)
    assert np.all(np.diff(prep.data.slice_idx) >= 0)
    for j in range(prep.data.n_slices):
        ks = prep.data.k[prep.data.slice_idx == j]
        assert np.all(np.diff(ks) > 0)
    assert set(prep.quote_index.tolist()) <= set(full.quote_index.tolist())
