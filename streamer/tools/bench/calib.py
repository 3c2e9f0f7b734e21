"""``streamer bench calib``: cold and warm full-surface fit time per model on a real chain.

The chain: a real BTC snapshot from ``../shared/data/deribit/snapshots`` (about 650 quotes,
13 expiries; ``--chain`` picks another CSV that ``streamer.chains`` reads). Cold: a fresh
calibrator (multi-start, no penalty). Warm: the calibrator after a fit of the chain, refitting
re-quotes of it (every bid and ask moved by up to a tick's worth of IV noise, seeded) - what
the daemon does between trigger ticks. Times are wall-clock medians over ``--repeat`` fits on
one thread, after a warm-up fit (numba compilation excluded), and include quote filtering and
IV computation (``prepare``), the fit, the arbitrage gate and the result's diagnostics.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.calibrator import Calibrator
from streamer.models import REGISTRY
from streamer.paths import deribit_data
from streamer.tools.chains import load_chains

DEFAULT_CHAIN = "snapshots/deribit_options_snapshot_20260105T041127Z.csv"
GOALS_MS = {
    "svi": 1.0,
    "ssvi": 2.0,
    "ssvi-rho": 2.0,
    "essvi": 2.0,
    "sabr": 1.0,
    "heston": 10.0,
    "bates": 15.0,
}


def shared_data() -> Path:
    return deribit_data()


def requote(snap: ChainSnapshot, rng: np.random.Generator, noise: float = 0.02) -> ChainSnapshot:
    """The chain with every price moved by up to ``noise`` of its half-spread (both sides)."""
    half = 0.5 * (snap.ask - snap.bid)
    shift = noise * half * rng.uniform(-1.0, 1.0, size=snap.n_quotes)
    return dataclasses.replace(snap, bid=snap.bid + shift, ask=snap.ask + shift)


def bench_model(name: str, snap: ChainSnapshot, repeat: int, seed: int) -> dict[str, float]:
    model = REGISTRY[name]()
    Calibrator(model).fit(snap)  # compile / warm caches
    cold_t, cold_nfev = [], []
    for _ in range(max(3, repeat // 5)):
        cal = Calibrator(model)
        t0 = time.perf_counter()
        r = cal.fit(snap)
        cold_t.append(time.perf_counter() - t0)
        cold_nfev.append(r.nfev)
    cal = Calibrator(model)
    first = cal.fit(snap)
    rng = np.random.default_rng(seed)
    quotes = [requote(snap, rng) for _ in range(repeat)]
    warm_t, warm_nfev, bands = [], [], []
    for q in quotes:
        t0 = time.perf_counter()
        r = cal.fit(q)
        warm_t.append(time.perf_counter() - t0)
        warm_nfev.append(r.nfev)
        bands.append(r.in_band)
    return {
        "quotes": float(first.n_quotes),
        "slices": float(len(first.slices)),
        "cold_ms": float(np.median(cold_t) * 1e3),
        "cold_nfev": float(np.median(cold_nfev)),
        "warm_ms": float(np.median(warm_t) * 1e3),
        "warm_p95_ms": float(np.percentile(warm_t, 95) * 1e3),
        "warm_nfev": float(np.median(warm_nfev)),
        "in_band": float(np.mean(bands)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer bench calib", description=__doc__)
    ap.add_argument("--chain", help=f"chain CSV (default ../shared/data/deribit/{DEFAULT_CHAIN})")
    ap.add_argument("--model", action="append", help="model(s) (default: all registered)")
    ap.add_argument("--repeat", type=int, default=30, help="warm fits per model")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    path = Path(args.chain) if args.chain else shared_data() / DEFAULT_CHAIN
    if not path.exists():
        print(f"bench calib: chain not found: {path} (the real data lives in ../shared)")
        return 1
    snap = load_chains(path, "BTC")[0]
    models = args.model or [m for m in GOALS_MS if m in REGISTRY]
    print(f"chain: {path.name}, {snap.n_quotes} BTC quotes, {snap.n_expiries} expiries")
    print()
    print(
        "| model | fitted quotes | slices | cold ms | cold nfev | warm ms (p50) | warm ms (p95) "
        "| warm nfev | goal warm ms | in_band (warm) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in models:
        r = bench_model(name, snap, args.repeat, args.seed)
        print(
            f"| {name} | {r['quotes']:.0f} | {r['slices']:.0f} | {r['cold_ms']:.1f} | "
            f"{r['cold_nfev']:.0f} | {r['warm_ms']:.2f} | {r['warm_p95_ms']:.2f} | "
            f"{r['warm_nfev']:.0f} | {GOALS_MS.get(name, float('nan')):g} | {r['in_band']:.3f} |"
        )
    return 0
