"""Implied-vol benchmark: streamer's kernel vs vollib (pure-Python LBR) vs a scipy brentq loop.

Inputs: a realistic chain-like sample (log-moneyness within +-2.5 standard deviations, vol
30%..150%, T from 1 day to 1.5 years, calls and puts), priced with ``black_price``. Reports ns
per option on one thread and each method's max relative error against the vol that made the
price, all in the same run. The slow references run on a subsample.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamer.pricing import black_price, implied_vol

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Row:
    method: str
    n: int
    ns_per_option: float
    max_rel_error: float


def sample(
    n: int, seed: int = 7
) -> tuple[Array, Array, Array, Array, npt.NDArray[np.bool_], Array]:
    rng = np.random.default_rng(seed)
    F = np.full(n, 50_000.0)
    T = rng.uniform(1.0 / 365.0, 1.5, n)
    sigma = rng.uniform(0.3, 1.5, n)
    K = F * np.exp(rng.uniform(-2.5, 2.5, n) * sigma * np.sqrt(T))
    is_call = rng.random(n) < 0.5
    price = np.asarray(black_price(F, K, T, sigma, is_call))
    return price, F, K, T, is_call, sigma


def _time(fn: Callable[[], Array], repeat: int) -> tuple[float, Array]:
    best = math.inf
    out = fn()
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _max_err(iv: Array, sigma: Array) -> float:
    err = np.abs(iv - sigma) / sigma
    return float(np.max(np.where(np.isfinite(err), err, np.inf)))


def _ours(price: Array, F: Array, K: Array, T: Array, c: npt.NDArray[np.bool_]) -> Array:
    return np.asarray(implied_vol(price, F, K, T, c))


def run(sizes: tuple[int, ...] = (800, 100_000), ref_n: int = 2_000) -> list[Row]:
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    rows: list[Row] = []
    for n in sizes:
        price, F, K, T, c, sigma = sample(n)
        implied_vol(price[:4], F[:4], K[:4], T[:4], c[:4])  # compile outside the timing
        repeat = max(3, 2_000_000 // n)
        dt, iv = _time(functools.partial(_ours, price, F, K, T, c), repeat)
        rows.append(Row("streamer.implied_vol", n, dt / n * 1e9, _max_err(iv, sigma)))
    price, F, K, T, c, sigma = sample(ref_n, seed=11)
    try:
        from vollib.black.implied_volatility import implied_volatility as vollib_iv
    except ImportError:  # pragma: no cover - dev extra not installed
        vollib_iv = None
    if vollib_iv is not None:
        flags = np.where(c, "c", "p")

        def run_vollib() -> Array:
            return np.array(
                [vollib_iv(price[i], F[i], K[i], 0.0, T[i], flags[i]) for i in range(ref_n)]
            )

        dt, iv = _time(run_vollib, 1)
        rows.append(Row("vollib (pure-Python LBR)", ref_n, dt / ref_n * 1e9, _max_err(iv, sigma)))
    from scipy.optimize import brentq

    def run_brentq() -> Array:
        out = np.empty(ref_n)
        for i in range(ref_n):
            p, f, k, t, cc = price[i], F[i], K[i], T[i], bool(c[i])
            out[i] = brentq(
                lambda s, p=p, f=f, k=k, t=t, cc=cc: float(black_price(f, k, t, s, cc)) - p,
                1e-4,
                10.0,
                xtol=1e-15,
                rtol=1e-15,
            )
        return out

    dt, iv = _time(run_brentq, 1)
    rows.append(Row("scipy brentq loop", ref_n, dt / ref_n * 1e9, _max_err(iv, sigma)))
    return rows


def table(rows: list[Row]) -> str:
    ours = min(r.ns_per_option for r in rows if r.method.startswith("streamer"))
    lines = [
        "| method | options | ns/option | time vs streamer | max rel. error |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.n:,} | {r.ns_per_option:,.0f} | "
            f"{r.ns_per_option / ours:,.0f}x | {r.max_rel_error:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer bench iv", description=__doc__.splitlines()[0])
    ap.add_argument("--ref-n", type=int, default=2_000, help="options for the slow references")
    args = ap.parse_args(argv)
    print(table(run(ref_n=args.ref_n)))
    return 0
