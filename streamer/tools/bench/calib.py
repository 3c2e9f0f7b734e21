"""``streamer bench calib``: cold and warm full-surface fit time per model on a real chain.

The chain: a real BTC snapshot from ``../shared/data/deribit/snapshots`` (about 650 quotes,
13 expiries; ``--chain`` picks another CSV that ``streamer.chains`` reads). Cold: a fresh
calibrator (multi-start, no penalty). Warm: the calibrator after a fit of the chain, refitting
re-quotes of it (every bid and ask moved by up to a tick's worth of IV noise, seeded) - what
the daemon does between trigger ticks. Each model is fitted under its own config
(``CalibConfig.for_model``: its ``calib_defaults``, as the daemon does). Times are wall-clock
medians over ``--repeat`` fits on one thread, after a warm-up fit (numba compilation excluded),
and the best-of-N CPU time (the load average is printed: the machine may be shared); they
include quote filtering and IV computation (``prepare``), the fit, the arbitrage gate and the
result's diagnostics.

``--cold`` adds, for the stochastic-volatility models, each cold path (``CalibConfig.cold_start``:
the hand-made multi-start, the learned guess + LM, the global search + LM) with its time and
data cost, and the share of local LM runs from ``--starts`` random points of the box that reach
the best cost found (within 0.1%), beside QuantLib's Heston calibration of the same quotes
(``HestonModelHelper`` per quote on its mid vol, ``AnalyticHestonEngine``, its
Levenberg-Marquardt from one default start), scored by our pricer on our cost and band.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.calibrator import CalibConfig, Calibrator
from streamer.calib.data import prepare
from streamer.calib.evaluate import surface_evaluator
from streamer.calib.lm import solve
from streamer.calib.options import ColdStart
from streamer.calib.result import block_band
from streamer.models import REGISTRY
from streamer.models.base import FitData, FloatArray, Model
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
    "heston-td": 15.0,
    "bates-td": 15.0,
    "bates-tdl": 15.0,
    "spline": 1.0,
}
COLD_GOALS_MS = {"heston": 5.0, "bates": 10.0}  # the learned cold path (issue 16)
SV_MODELS = ("heston", "bates", "heston-td", "bates-td", "bates-tdl")
COLD_STARTS: tuple[ColdStart, ...] = ("guesses", "learned", "global")


def shared_data() -> Path:
    return deribit_data()


def requote(snap: ChainSnapshot, rng: np.random.Generator, noise: float = 0.02) -> ChainSnapshot:
    """The chain with every price moved by up to ``noise`` of its half-spread (both sides)."""
    half = 0.5 * (snap.ask - snap.bid)
    shift = noise * half * rng.uniform(-1.0, 1.0, size=snap.n_quotes)
    return dataclasses.replace(snap, bid=snap.bid + shift, ask=snap.ask + shift)


def bench_model(name: str, snap: ChainSnapshot, repeat: int, seed: int) -> dict[str, float]:
    """Cold and warm fits of ``snap`` under the model's own config (``CalibConfig.for_model``:
    its ``calib_defaults``, as the daemon fits it): wall-clock medians and best-of-N CPU
    time (``time.process_time``: what other processes on a shared machine take least from)."""
    model = REGISTRY[name]()
    cfg = CalibConfig.for_model(model)
    Calibrator(model, cfg).fit(snap)  # compile / warm caches
    cold_t, cold_cpu, cold_nfev = [], [], []
    for _ in range(max(3, repeat // 5)):
        cal = Calibrator(model, cfg)
        t0, c0 = time.perf_counter(), time.process_time()
        r = cal.fit(snap)
        cold_t.append(time.perf_counter() - t0)
        cold_cpu.append(time.process_time() - c0)
        cold_nfev.append(r.nfev)
    cal = Calibrator(model, cfg)
    first = cal.fit(snap)
    rng = np.random.default_rng(seed)
    quotes = [requote(snap, rng) for _ in range(repeat)]
    warm_t, warm_cpu, warm_nfev, bands = [], [], [], []
    for q in quotes:
        t0, c0 = time.perf_counter(), time.process_time()
        r = cal.fit(q)
        warm_t.append(time.perf_counter() - t0)
        warm_cpu.append(time.process_time() - c0)
        warm_nfev.append(r.nfev)
        bands.append(r.in_band)
    return {
        "quotes": float(first.n_quotes),
        "slices": float(len(first.slices)),
        "cold_ms": float(np.median(cold_t) * 1e3),
        "cold_cpu_best_ms": float(np.min(cold_cpu) * 1e3),
        "cold_nfev": float(np.median(cold_nfev)),
        "warm_ms": float(np.median(warm_t) * 1e3),
        "warm_p95_ms": float(np.percentile(warm_t, 95) * 1e3),
        "warm_cpu_best_ms": float(np.min(warm_cpu) * 1e3),
        "warm_nfev": float(np.median(warm_nfev)),
        "in_band": float(np.mean(bands)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer bench calib", description=__doc__)
    ap.add_argument("--chain", help=f"chain CSV (default ../shared/data/deribit/{DEFAULT_CHAIN})")
    ap.add_argument("--model", action="append", help="model(s) (default: all registered)")
    ap.add_argument("--repeat", type=int, default=30, help="warm fits per model")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="cold paths, success rates, QuantLib")
    ap.add_argument("--starts", type=int, default=10, help="random starts per model (--cold)")
    ap.add_argument(
        "--success",
        action="store_true",
        help="only the learned cold path's success rates on the shared snapshot chains and "
        "simulated ones (--sim chains a model)",
    )
    ap.add_argument("--sim", type=int, default=15, help="simulated chains a model (--success)")
    args = ap.parse_args(argv)
    if args.success:
        return success_main(args.model or ["heston", "bates"], args.sim, args.seed)
    path = Path(args.chain) if args.chain else shared_data() / DEFAULT_CHAIN
    if not path.exists():
        print(f"bench calib: chain not found: {path} (the real data lives in ../shared)")
        return 1
    snap = load_chains(path, "BTC")[0]
    models = args.model or [m for m in GOALS_MS if m in REGISTRY]
    print(f"chain: {path.name}, {snap.n_quotes} BTC quotes, {snap.n_expiries} expiries")
    print()
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores)")
    print(
        "| model | fitted quotes | slices | cold ms | cold cpu ms (best) | cold nfev "
        "| warm ms (p50) | warm ms (p95) | warm cpu ms (best) | warm nfev | goal warm ms "
        "| in_band (warm) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in models:
        r = bench_model(name, snap, args.repeat, args.seed)
        print(
            f"| {name} | {r['quotes']:.0f} | {r['slices']:.0f} | {r['cold_ms']:.1f} | "
            f"{r['cold_cpu_best_ms']:.1f} | {r['cold_nfev']:.0f} | {r['warm_ms']:.2f} | "
            f"{r['warm_p95_ms']:.2f} | {r['warm_cpu_best_ms']:.2f} | {r['warm_nfev']:.0f} | "
            f"{GOALS_MS.get(name, float('nan')):g} | {r['in_band']:.3f} |"
        )
    if args.cold:
        print()
        cold_table(snap, [m for m in models if m in SV_MODELS], args.starts, args.seed)
    return 0


def _cost_of(model: Model, data: FitData, x: FloatArray, cfg: CalibConfig) -> tuple[float, float]:
    """Data cost (the LM's) and in-band share of the fitted quotes at ``x``."""
    lo, hi = model.bounds(data.n_slices)
    problem = cfg.problem(
        surface_evaluator(model, data), data, np.zeros(1, dtype=np.int64), lo[None], hi[None]
    )
    r = solve(problem, np.clip(x, lo, hi)[None, :], max_iter=0)
    return float(r.data_cost[0]), float(block_band(r.iv, data, np.zeros(1, dtype=np.int64))[0])


def random_starts(
    model: Model, n_slices: int, n: int, rng: np.random.Generator
) -> list[FloatArray]:
    """Points of the model's box: log-uniform where the bound is positive, else uniform."""
    lo, hi = model.bounds(n_slices)
    pos = lo > 0.0
    llo = np.log(np.where(pos, lo, 1.0))
    lhi = np.log(np.where(pos, hi, 1.0))
    out = []
    for _ in range(n):
        u = rng.uniform(size=lo.shape)
        out.append(np.where(pos, np.exp(llo + u * (lhi - llo)), lo + u * (hi - lo)))
    return out


def cold_table(snap: ChainSnapshot, models: list[str], starts: int, seed: int) -> None:
    """Per model and cold path: time, nfev, cost, in-band, reached the best; local LM share."""
    cfg = CalibConfig()
    data = prepare(snap, cfg.filters, 3).data
    print(
        "| model | cold path | cold ms (best of 3) | nfev | data cost | in_band (fitted) "
        "| reaches best (0.1%) | goal ms |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for name in models:
        model = REGISTRY[name]()
        Calibrator(model, CalibConfig(cold_start="learned")).fit(snap)  # compile
        found: list[tuple[str, float, float, float, float]] = []
        for path in COLD_STARTS:
            times, r = [], None
            for _ in range(1 if path == "global" else 3):
                t0 = time.perf_counter()
                r = Calibrator(model, CalibConfig(cold_start=path)).fit(snap)
                times.append(time.perf_counter() - t0)
            assert r is not None
            cost, band = _cost_of(model, data, r.x[0], cfg)
            found.append((path, min(times) * 1e3, float(r.nfev), cost, band))
        rng = np.random.default_rng(seed)
        local = []
        lo, hi = model.bounds(data.n_slices)
        problem = cfg.problem(
            surface_evaluator(model, data), data, np.zeros(1, dtype=np.int64), lo[None], hi[None]
        )
        t0 = time.perf_counter()
        for x0 in random_starts(model, data.n_slices, starts, rng):
            local.append(
                float(solve(problem, x0[None, :], max_iter=cfg.max_iter_cold).data_cost[0])
            )
        local_ms = (time.perf_counter() - t0) * 1e3 / max(starts, 1)
        best = min([c for *_, c, _ in found] + [c for c in local if np.isfinite(c)])
        for label, ms, nfev, cost, band in found:
            goal = COLD_GOALS_MS.get(name) if label == "learned" else None
            print(
                f"| {name} | {label} | {ms:.1f} | {nfev:.0f} | {cost:.2f} | {band:.3f} | "
                f"{'yes' if cost <= 1.001 * best else 'no'} | {'' if goal is None else goal} |"
            )
        share = float(np.mean([c <= 1.001 * best for c in local])) if local else float("nan")
        print(
            f"| {name} | local LM, {starts} random starts | {local_ms:.1f} (each) | | "
            f"{min(local):.2f} | | {share:.0%} of starts | |",
            flush=True,
        )
    ql = quantlib_heston(data)
    if ql is not None:
        cost, band = _cost_of(REGISTRY["heston"](), data, ql[0], cfg)
        print(
            f"| QuantLib heston | LM, one default start | {ql[1]:.1f} | | {cost:.2f} | "
            f"{band:.3f} | | |"
        )


SIM_DAYS = (1, 2, 4, 7, 14, 30, 60, 91, 182, 273, 365)
REFERENCE_RANDOM = 5  # random starts beside the learned, rival and hand-made ones


def simulated_chain(
    model: Model, x: FloatArray, rng: np.random.Generator, forward: float = 60_000.0
) -> ChainSnapshot:
    """A coin-margined chain quoted around ``model`` at ``x``: ``SIM_DAYS`` expiries, 15
    strikes over 2.2 ATM standard deviations each side, bid/ask the model vol -+ 0.5 vol
    point with 0.2 points of noise on the centre (prices from Black-76)."""
    from streamer.calib.warmup import synthetic_snapshot
    from streamer.pricing import black_price

    base = synthetic_snapshot(SIM_DAYS, 15)
    k = np.log(base.strike / forward)
    atm = np.asarray(
        model.implied_vol(
            x, np.zeros(len(SIM_DAYS)), np.array(SIM_DAYS) / 365.0, np.arange(len(SIM_DAYS))
        )
    )
    # strikes by the model's own ATM vol (the base chain's are for 60 %)
    scale = np.where(np.isfinite(atm), atm / 0.6, 1.0)[base.expiry_idx]
    K = forward * np.exp(k * scale)
    k = np.log(K / forward)
    iv = np.asarray(model.implied_vol(x, k, base.T, base.expiry_idx))
    centre = iv + 0.002 * rng.standard_normal(iv.shape)
    ok = np.isfinite(centre) & (centre > 0.02)
    centre = np.where(ok, centre, 0.5)
    bid = np.asarray(
        black_price(forward, K, base.T, np.maximum(centre - 0.005, 0.01), base.is_call)
    )
    ask = np.asarray(black_price(forward, K, base.T, centre + 0.005, base.is_call))
    bid = np.where(ok, bid / forward, np.nan)
    ask = np.where(ok, ask / forward, np.nan)
    return dataclasses.replace(base, strike=K, bid=bid, ask=ask)


def reference_starts(model: Model, data: FitData, rng: np.random.Generator) -> list[FloatArray]:
    """The starts whose best converged LM run is the reference optimum: the network's
    guess, its rivals, the hand-made guesses and ``REFERENCE_RANDOM`` random points of the
    box (Heston 1 + 3 + 5, Bates 1 + 2 + 6 + 5)."""
    from streamer.calib.learned import learned_guess

    out: list[FloatArray] = []
    g = learned_guess(model, data)
    if g is not None:
        rivals = getattr(model, "learned_rivals", None)
        out.extend([g, *([] if rivals is None else rivals(g))])
    out.extend(model.initial_guesses(data))
    out.extend(random_starts(model, data.n_slices, REFERENCE_RANDOM, rng))
    return out


def success_row(
    model: Model, snap: ChainSnapshot, rng: np.random.Generator
) -> tuple[bool, float, float, float] | None:
    """One chain: (the default cold fit reaches the reference optimum within 0.1 %, its
    evaluations, its CPU ms, its cost over the optimum's); None when it has no quotes."""
    cfg = CalibConfig.for_model(model)
    data = prepare(snap, cfg.filters, 3).data
    if data.n_slices == 0:
        return None
    c0 = time.process_time()
    r = Calibrator(model, cfg).fit(snap)
    cpu = (time.process_time() - c0) * 1e3
    if not r.success:
        return False, float(r.nfev), cpu, math.inf
    cost, _ = _cost_of(model, data, r.x[0], cfg)
    lo, hi = model.bounds(data.n_slices)
    problem = cfg.problem(
        surface_evaluator(model, data), data, np.zeros(1, dtype=np.int64), lo[None], hi[None]
    )
    best = cost
    for x0 in reference_starts(model, data, rng):
        res = solve(problem, np.clip(x0, lo, hi)[None, :], max_iter=cfg.max_iter_cold)
        c = float(res.data_cost[0])
        if np.isfinite(c):
            best = min(best, c)
    return cost <= 1.001 * best, float(r.nfev), cpu, cost / best


def success_main(models: list[str], n_sim: int, seed: int) -> int:
    """Per model: the share of the shared snapshot chains (BTC and ETH of every file) and of
    ``n_sim`` simulated chains (parameters drawn as ``streamer train`` draws them) on which
    the model's default cold fit (``CalibConfig.for_model``) reaches the best converged LM
    run of ``reference_starts`` within 0.1 %; median evaluations and CPU ms."""
    from streamer.tools.train.data import parameters

    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores)")
    snaps: list[tuple[str, ChainSnapshot]] = []
    for f in sorted((shared_data() / "snapshots").glob("*.csv")):
        for u in ("BTC", "ETH"):
            snaps.extend((f"{f.stem[-16:]} {u}", s) for s in load_chains(f, u)[:1])
    print(
        "| model | data set | chains | reach best (0.1%) | median nfev | median cpu ms | missed |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for name in models:
        model = REGISTRY[name]()
        Calibrator(model, CalibConfig.for_model(model)).fit(snaps[0][1])  # compile
        rng = np.random.default_rng(seed)
        sims = [
            (
                f"sim {i}",
                simulated_chain(model, parameters(model, np.array(SIM_DAYS) / 365.0, rng), rng),
            )
            for i in range(n_sim)
        ]
        for label, chains in (("shared snapshots", snaps), ("simulated", sims)):
            rows, missed = [], []
            for tag, snap in chains:
                row = success_row(model, snap, np.random.default_rng(seed))
                if row is None:
                    continue
                rows.append(row)
                if not row[0]:
                    missed.append(f"{tag} (x{row[3]:.4f})")
            hit = sum(1 for r in rows if r[0])
            print(
                f"| {name} | {label} | {len(rows)} | {hit}/{len(rows)} | "
                f"{np.median([r[1] for r in rows]):.0f} | {np.median([r[2] for r in rows]):.1f} | "
                f"{', '.join(missed)} |",
                flush=True,
            )
    return 0


QL_START = (0.1, 1.0, 0.1, 0.5, -0.5)  # v0, kappa, theta, xi (sigma), rho: QuantLib's examples


def quantlib_heston(data: FitData) -> tuple[FloatArray, float] | None:
    """QuantLib's Heston calibration of the quotes of ``data`` (forward 1, zero rates, one
    helper per quote on its mid vol, maturities rounded to whole days as its helpers take
    them): parameters ``[v0, kappa, theta, xi, rho]`` and wall time in ms (None without
    QuantLib)."""
    try:
        import QuantLib as ql
    except ImportError:
        return None
    today = ql.Date(5, 1, 2026)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    curve = ql.YieldTermStructureHandle(ql.FlatForward(today, 0.0, dc))
    spot = ql.QuoteHandle(ql.SimpleQuote(1.0))
    v0, kappa, theta, xi, rho = QL_START
    process = ql.HestonProcess(curve, curve, spot, v0, kappa, theta, xi, rho)
    model = ql.HestonModel(process)
    engine = ql.AnalyticHestonEngine(model)
    helpers = []
    calendar = ql.NullCalendar()
    for k, t, iv in zip(data.k, data.T, data.iv, strict=True):
        days = max(1, round(float(t) * 365.0))
        h = ql.HestonModelHelper(
            ql.Period(days, ql.Days),
            calendar,
            1.0,
            float(np.exp(k)),
            ql.QuoteHandle(ql.SimpleQuote(float(iv))),
            curve,
            curve,
        )
        h.setPricingEngine(engine)
        helpers.append(h)
    t0 = time.perf_counter()
    model.calibrate(
        helpers, ql.LevenbergMarquardt(1e-8, 1e-8, 1e-8), ql.EndCriteria(500, 300, 1e-8, 1e-8, 1e-8)
    )
    ms = (time.perf_counter() - t0) * 1e3
    theta_, kappa_, xi_, rho_, v0_ = (float(v) for v in model.params())
    return np.array([v0_, kappa_, theta_, xi_, rho_]), ms
