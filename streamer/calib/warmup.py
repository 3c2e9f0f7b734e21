"""Load (or compile) the numba kernels before the first live fit.

A cold numba cache makes the first fit of a fresh install take ~15 s (the kernels compile);
after that they load from the disk cache in well under a second. The daemon calls
``warm_up`` before it reports ready, so the first surface of a session is not that late.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from streamer.book import snapkernel
from streamer.book.snapshot import ChainSnapshot
from streamer.calib.calibrator import Calibrator
from streamer.models import Model
from streamer.pricing import black_greeks, black_price

DAY_MS = 86_400_000
T0_MS = 1_700_006_400_000  # a Wednesday 08:00 UTC (any time works)


def synthetic_snapshot(days: tuple[int, ...] = (7, 30, 91), n_strikes: int = 15) -> ChainSnapshot:
    """A small coin-margined chain quoted around a skewed smile (prices from Black-76)."""
    forward = 60_000.0
    rows: list[tuple[int, float, bool]] = []
    for j, d in enumerate(days):
        for k in np.linspace(-2.0, 2.0, n_strikes) * 0.6 * np.sqrt(d / 365.0):
            rows.extend((j, float(forward * np.exp(k)), c) for c in (True, False))
    e = np.array([r[0] for r in rows], dtype=np.int64)
    K = np.array([r[1] for r in rows])
    call = np.array([r[2] for r in rows])
    T = np.asarray(np.array(days, dtype=np.float64)[e] / 365.0)
    k = np.log(K / forward)
    iv = 0.6 - 0.15 * k + 0.3 * k * k
    bid = np.asarray(black_price(forward, K, T, iv - 0.01, call)) / forward
    ask = np.asarray(black_price(forward, K, T, iv + 0.01, call)) / forward
    n = len(rows)
    nan = np.full(n, np.nan)
    return ChainSnapshot(
        venue="warmup",
        underlying="BTC",
        ts_ms=T0_MS,
        inverse=True,
        instrument=tuple(f"W-{i}" for i in range(n)),
        expiry_idx=e,
        T=T,
        forward=np.full(n, forward),
        strike=K,
        is_call=call,
        bid=bid,
        ask=ask,
        bid_size=np.ones(n),
        ask_size=np.ones(n),
        bid_iv=nan,
        ask_iv=nan,
        mark_iv=nan,
        mark_price=nan,
        venue_delta=nan,
        quote_ts_ms=np.full(n, T0_MS, dtype=np.int64),
        expiries=tuple(f"{d}D" for d in days),
        expiry_ms=np.array([T0_MS + d * DAY_MS for d in days], dtype=np.int64),
        forwards=np.full(len(days), forward),
        dirty=np.ones(n, dtype=np.bool_),
    )


def warm_up(models: Iterable[Model]) -> float:
    """Fit the synthetic chain once per model (cold, then warm) and compute Greeks, after the
    book's snapshot kernels; returns the seconds it took (compilation included when the
    cache was cold)."""
    t0 = time.perf_counter()
    snapkernel.warm_up()
    snap = synthetic_snapshot()
    black_greeks(snap.forward, snap.strike, snap.T, np.full(snap.n_quotes, 0.6), snap.is_call)
    for model in models:
        cal = Calibrator(model)
        cal.fit(snap)
        cal.fit(snap)
    return time.perf_counter() - t0
