"""``streamer bench quality``: fit quality per model on the real Deribit chains in ../shared.

For each data set (DESIGN section 6: the bottama ``get_order_book`` chains, the hourly Tardis
smiles, the week of snapshots) and each underlying (BTC, ETH), every chain is fitted in time
order by one calibrator per model (warm after the first, as the daemon runs), and measured
over the quotes the calibrator fits (out-of-the-money, both sides quoted, filters as
configured): ``in_band`` (share of fitted IVs inside the market's bid-ask IV band, mean over
fits), median and 95th percentile of ``|fitted IV - Deribit mark_iv|`` in vol points (pooled
over all fitted quotes), and the median fit time. The snapshots carry no bid/ask IVs: the
calibrator implies them from the prices; the Tardis smiles carry IVs only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from streamer.calib.calibrator import Calibrator
from streamer.models import REGISTRY
from streamer.tools.bench.calib import shared_data
from streamer.tools.chains import load_chains

DATASETS = {
    "bottama": "chains/bottama-*.csv",
    "tardis": "smiles/tardis-hourly-*.csv",
    "snapshots": "snapshots/deribit_options_snapshot_*.csv",
}
GOALS = {
    "svi": 0.97,
    "ssvi": 0.90,
    "ssvi-rho": 0.90,
    "essvi": 0.90,
    "bates": 0.80,
    "heston": 0.65,
    "bates-td": 0.75,
}
SV_MODELS = ("heston-td", "bates-td", "bates-tdl")  # issue 16: beside heston and bates


def evaluate_quantlib_heston(files: list[Path], underlyings: tuple[str, ...]) -> dict[str, float]:
    """``evaluate``'s numbers for QuantLib's Heston calibration, each chain fitted cold from
    QuantLib's default start (``streamer.tools.bench.calib.quantlib_heston``) on the quotes
    our calibrator fits, scored with our pricer at QuantLib's parameters."""
    from streamer.calib.data import prepare
    from streamer.calib.options import CalibConfig
    from streamer.calib.result import block_band
    from streamer.tools.bench.calib import quantlib_heston

    heston = REGISTRY["heston"]()
    bands: list[float] = []
    diffs: list[np.ndarray] = []
    times: list[float] = []
    fits = failed = 0
    for under in underlyings:
        for f in sorted(files):
            for snap in load_chains(f, under):
                prep = prepare(snap, CalibConfig().filters, 3)
                fits += 1
                found = quantlib_heston(prep.data) if prep.data.n_quotes else None
                if found is None:
                    failed += 1
                    continue
                x, ms = found
                d = prep.data
                iv = heston.implied_vol(x, d.k, d.T, d.slice_idx)
                times.append(ms)
                bands.append(float(block_band(iv, d, np.zeros(1, dtype=np.int64))[0]))
                dd = np.abs(iv - snap.mark_iv[prep.quote_index]) * 100.0
                diffs.append(dd[np.isfinite(dd)])
    pooled = np.concatenate(diffs) if diffs else np.zeros(0)
    return {
        "fits": float(fits),
        "failed": float(failed),
        "in_band": float(np.mean(bands)) if bands else float("nan"),
        "median": float(np.median(pooled)) if pooled.size else float("nan"),
        "p95": float(np.percentile(pooled, 95)) if pooled.size else float("nan"),
        "ms": float(np.median(times)) if times else float("nan"),
    }


def evaluate(files: list[Path], model: str, underlyings: tuple[str, ...]) -> dict[str, float]:
    bands: list[float] = []
    diffs: list[np.ndarray] = []
    times: list[float] = []
    fits = failed = 0
    for under in underlyings:
        snaps = []
        for f in sorted(files):
            snaps.extend(load_chains(f, under))
        snaps.sort(key=lambda s: s.ts_ms)
        cal = Calibrator(REGISTRY[model]())
        for snap in snaps:
            t0 = time.perf_counter()
            r = cal.fit(snap)
            times.append((time.perf_counter() - t0) * 1e3)
            fits += 1
            if not r.success or r.prepared is None:
                failed += 1
                continue
            bands.append(r.in_band)
            mark = snap.mark_iv[r.prepared.quote_index]
            d = np.abs(r.fitted_iv - mark) * 100.0
            diffs.append(d[np.isfinite(d)])
    pooled = np.concatenate(diffs) if diffs else np.zeros(0)
    return {
        "fits": float(fits),
        "failed": float(failed),
        "in_band": float(np.mean(bands)) if bands else float("nan"),
        "median": float(np.median(pooled)) if pooled.size else float("nan"),
        "p95": float(np.percentile(pooled, 95)) if pooled.size else float("nan"),
        "ms": float(np.median(times)) if times else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer bench quality", description=__doc__)
    ap.add_argument("--model", action="append", help="model(s) (default: all registered)")
    ap.add_argument("--dataset", action="append", choices=sorted(DATASETS))
    ap.add_argument("--underlying", action="append", help="BTC and/or ETH (default both)")
    ap.add_argument("--quantlib", action="store_true", help="also QuantLib's Heston calibration")
    args = ap.parse_args(argv)
    root = shared_data()
    if not root.is_dir():
        print(f"bench quality: real data not found at {root}")
        return 1
    all_models = ("svi", "ssvi", "ssvi-rho", "essvi", "sabr", "heston", "bates", *SV_MODELS)
    models = args.model or [m for m in all_models if m in REGISTRY]
    unders = tuple(args.underlying or ("BTC", "ETH"))
    print(
        "| data set | model | fits | failed | in_band | median abs(fit - mark) (vol pts) "
        "| p95 (vol pts) | fit ms (p50) | in_band goal |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for ds in args.dataset or list(DATASETS):
        files = sorted(root.glob(DATASETS[ds]))
        for m in models:
            r = evaluate(files, m, unders)
            goal = GOALS.get(m)
            print(
                f"| {ds} | {m} | {r['fits']:.0f} | {r['failed']:.0f} | {r['in_band']:.3f} | "
                f"{r['median']:.3f} | {r['p95']:.2f} | {r['ms']:.1f} | "
                f"{'' if goal is None else f'{goal:.2f}'} |",
                flush=True,
            )
        if args.quantlib:
            r = evaluate_quantlib_heston(files, unders)
            print(
                f"| {ds} | QuantLib heston | {r['fits']:.0f} | {r['failed']:.0f} | "
                f"{r['in_band']:.3f} | {r['median']:.3f} | {r['p95']:.2f} | {r['ms']:.1f} | |",
                flush=True,
            )
    return 0
