"""``streamer bench quality``: issue 13's measure on the real Deribit chains in ../shared.

For each data set (the bottama ``get_order_book`` chains, the hourly Tardis smiles, the week
of snapshots; DESIGN section 6) and each underlying, every chain is run in time order through
the daemon's own output path: one ``Pipeline`` per model (its ``CalibConfig`` built as the
daemon builds it: ``CalibConfig.for_model``, the model's defaults), warm after the first
chain, publishing greeks messages; a bot's view is the last greeks message per expiry.

Scored (``streamer.tools.bench.measure``): every instrument with bid IV > 0 and ask IV > bid IV
(Deribit's IVs; the snapshots carry none: implied from their prices), OTM against its expiry's
forward, T >= 2 h. In band when bid IV <= published IV <= ask IV; an instrument missing from the
greeks or with a null IV is a miss. Columns:

* ``in band``: share of scored instruments in band (pooled over chains);
* ``median``, ``p95``: of ``|iv - mark_iv|`` in vol points (over instruments with an IV);
* ``fit ms``: median calibrator time per chain (CPU load shared: compare within one run);
* ``ceiling``: the model family's best on the measure, an unconstrained ``N_STARTS``-start
  per-slice band fit (``streamer.tools.bench.baseline.ceiling``; per-expiry models only);
* ``stab``: median over successive chains of ``sum |d iv| / sum |d mid iv|`` over the
  instruments scored in both (fixed strikes; goal <= 1);
* ``arb``: findings of the independent check (``streamer.tools.bench.arbcheck``) on the
  published IVs at every listed strike (butterflies per expiry, calendars between
  neighbouring expiries), summed over chains (goal 0).

Rows ``deribit mark`` (Deribit's own mark IV: the anchor) and ``scipy svi`` (plain per-slice
SVI on the mids, no arbitrage constraints: the baseline) are scored the same way.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.options import CalibConfig
from streamer.daemon.pipeline import Pipeline
from streamer.instruments import MS_PER_YEAR
from streamer.models import REGISTRY
from streamer.tools.bench import arbcheck, baseline
from streamer.tools.bench.calib import shared_data
from streamer.tools.bench.measure import Retained, Scored, Tally, lookup, scored
from streamer.tools.chains import load_chains

DATASETS = {
    "bottama": "chains/bottama-*.csv",
    "tardis": "smiles/tardis-hourly-*.csv",
    "snapshots": "snapshots/deribit_options_snapshot_*.csv",
}
DEFAULT_MODELS = ("spline", "svi", "sabr")
GOALS = {"spline": 0.98, "svi": 0.92, "sabr": 0.75}  # issue 13, all chains overall
MARK, BASELINE = "deribit mark", "scipy svi"


@dataclass
class Row:
    """Everything one method scored on one data set."""

    tally: Tally = field(default_factory=Tally)
    ceiling: Tally = field(default_factory=Tally)
    ms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # per successive pair of chains
    arb: int = 0
    arb_chains: int = 0
    chains: int = 0

    def merge(self, other: Row) -> None:
        self.tally.merge(other.tally)
        self.ceiling.merge(other.ceiling)
        self.ms.extend(other.ms)
        self.ratios.extend(other.ratios)
        self.arb += other.arb
        self.arb_chains += other.arb_chains
        self.chains += other.chains


class _Track:
    """Stability: the previous chain's IVs and mids of the scored instruments by name."""

    def __init__(self) -> None:
        self.prev: dict[str, tuple[float, float]] = {}

    def step(self, snap: ChainSnapshot, s: Scored, iv: np.ndarray) -> float:
        names = [snap.instrument[i] for i in s.index]
        now = dict(zip(names, zip(iv.tolist(), s.mid_iv.tolist(), strict=True), strict=True))
        d_iv = d_mid = 0.0
        for name, (v, mid) in now.items():
            old = self.prev.get(name)
            if old is None or not (math.isfinite(v) and math.isfinite(old[0])):
                continue
            d_iv += abs(v - old[0])
            d_mid += abs(mid - old[1])
        self.prev = now
        return d_iv / d_mid if d_mid > 0.0 else math.nan


def _smiles(snap: ChainSnapshot, iv_all: np.ndarray) -> list[arbcheck.Smile]:
    """Per expiry of ``snap``: its strikes and the IVs ``iv_all`` (one per instrument)."""
    out = []
    for e, expiry in enumerate(snap.expiries):
        m = snap.expiry_idx == e
        T = (int(snap.expiry_ms[e]) - snap.ts_ms) / MS_PER_YEAR
        out.append(arbcheck.Smile(expiry, T, float(snap.forwards[e]), snap.strike[m], iv_all[m]))
    return out


def _log_moneyness(snap: ChainSnapshot) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.log(snap.strike / snap.forwards[snap.expiry_idx]))


def _pipeline(model: str, underlying: ChainSnapshot) -> Pipeline:
    pipe = Pipeline(
        models=[model],
        calib={model: CalibConfig.for_model(REGISTRY[model])},
        tenors_days=(),
    )
    pipe.keep_records = True
    # register the underlying (a chain file has no book: the snapshots come ready-made)
    pipe._underlying(pipe.books.book(underlying.venue, underlying.underlying))
    return pipe


def run_chains(
    snaps: Sequence[ChainSnapshot],
    models: Sequence[str],
    *,
    ceilings: bool = True,
    ceiling_every: int = 1,
    anchors: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Row]:
    """Score every method on one underlying's chains, in time order (``anchors``: also
    Deribit's mark and the scipy baseline)."""
    snaps = sorted(snaps, key=lambda s: s.ts_ms)
    rows: dict[str, Row] = {MARK: Row(), BASELINE: Row()} if anchors else {}
    rows.update({m: Row() for m in models})
    if not snaps:
        return rows
    pipes = {m: _pipeline(m, snaps[0]) for m in models}
    retained = {m: Retained() for m in models}
    tracks = {name: _Track() for name in rows}
    for n, snap in enumerate(snaps):
        s = scored(snap)
        k_all = _log_moneyness(snap)
        views: dict[str, tuple[np.ndarray, list[arbcheck.Smile]]] = {}
        if anchors:
            views[MARK] = (snap.mark_iv.astype(np.float64), [])
            fns = baseline.svi_baseline(s)
            views[BASELINE] = (baseline.evaluate(fns, k_all, snap.expiry_idx), [])
        for m in models:
            pipe = pipes[m]
            msgs = pipe.fit_snapshot(snap)
            rec, pipe.records = pipe.records, []
            rows[m].ms.extend(r.result.elapsed_ms for r in rec)
            retained[m].update(msgs)
            greeks = retained[m].expiries()
            views[m] = (lookup(snap, retained[m].ivs()), arbcheck.smiles_of_greeks(greeks))
            if ceilings and n % ceiling_every == 0:
                c = baseline.ceiling(REGISTRY[m](), s)
                if c:
                    rows[m].ceiling.add(s, baseline.evaluate(c, k_all, snap.expiry_idx)[s.index])
        for name, (iv_all, smiles) in views.items():
            row = rows[name]
            row.chains += 1
            iv = iv_all[s.index]
            row.tally.add(s, iv)
            ratio = tracks[name].step(snap, s, iv)
            if math.isfinite(ratio):
                row.ratios.append(ratio)
            found = arbcheck.check(smiles or _smiles(snap, iv_all))
            row.arb += len(found)
            row.arb_chains += bool(found)
        if progress is not None:
            progress(f"{snap.underlying} chain {n + 1}/{len(snaps)}")
    return rows


def _fmt(v: float, spec: str) -> str:
    return "" if not math.isfinite(v) else format(v, spec)


def print_row(ds: str, name: str, r: Row) -> None:
    t = r.tally
    ms = float(np.median(r.ms)) if r.ms else math.nan
    ceil = r.ceiling.share if r.ceiling.scored else math.nan
    stab = float(np.median(r.ratios)) if r.ratios else math.nan
    goal = GOALS.get(name)
    print(
        f"| {ds} | {name} | {r.chains} | {t.scored} | {t.missing} | {_fmt(t.share, '.3f')} | "
        f"{_fmt(t.pct(50), '.3f')} | {_fmt(t.pct(95), '.2f')} | {_fmt(ms, '.2f')} | "
        f"{_fmt(ceil, '.3f')} | {_fmt(stab, '.2f')} | {r.arb} ({r.arb_chains}) | "
        f"{'' if goal is None else f'{goal:.2f}'} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer bench quality", description=__doc__)
    ap.add_argument(
        "--models",
        default=None,
        help=f"comma-separated registered models (default: {','.join(DEFAULT_MODELS)}, those "
        "registered)",
    )
    ap.add_argument("--dataset", action="append", choices=sorted(DATASETS))
    ap.add_argument("--underlying", action="append", help="BTC and/or ETH (default both)")
    ap.add_argument("--limit", type=int, default=0, help="first N chains per data set and coin")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the ceiling fits")
    ap.add_argument(
        "--ceiling-every", type=int, default=1, help="ceiling fits on every N-th chain only"
    )
    args = ap.parse_args(argv)
    root = shared_data()
    if not root.is_dir():
        print(f"bench quality: real data not found at {root}")
        return 1
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in REGISTRY]
        if unknown:
            print(f"bench quality: unknown model(s) {unknown}; registered: {sorted(REGISTRY)}")
            return 2
    else:
        models = [m for m in DEFAULT_MODELS if m in REGISTRY]
    unders = tuple(args.underlying or ("BTC", "ETH"))
    print(
        "| data set | method | chains | scored | missing | in band | median abs(iv - mark) "
        "(vol pts) | p95 (vol pts) | fit ms (p50) | ceiling | stab (p50) | arb findings "
        "(chains) | in band goal |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    overall: dict[str, Row] = {}
    t0 = time.process_time()
    for ds in args.dataset or list(DATASETS):
        files = sorted(root.glob(DATASETS[ds]))
        per: dict[str, Row] = {}
        for under in unders:
            snaps: list[ChainSnapshot] = []
            for f in files:
                snaps.extend(load_chains(f, under))
            snaps.sort(key=lambda s: s.ts_ms)
            if args.limit:
                snaps = snaps[: args.limit]
            rows = run_chains(
                snaps,
                models,
                ceilings=not args.no_ceiling,
                ceiling_every=max(args.ceiling_every, 1),
            )
            for name, r in rows.items():
                per.setdefault(name, Row()).merge(r)
        for name, r in per.items():
            print_row(ds, name, r)
            overall.setdefault(name, Row()).merge(r)
    for name, r in overall.items():
        print_row("**all**", name, r)
    print(f"\n(CPU {time.process_time() - t0:.0f} s)")
    return 0
