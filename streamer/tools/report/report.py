"""``streamer report FILE...``: how well each model fits real chains, against the venue's marks.

Inputs: recordings (``.jsonl[.gz|.zst]``, replayed through parse -> book -> trigger ->
calibrators exactly as ``streamer replay`` does, see ``streamer.replay_cmd.items_of``), Tardis
``options_chain`` CSVs, and the real chain CSVs that ``streamer.chains.load_chains`` recognises
by their header (``get_order_book`` dumps, full-chain snapshots, hourly Tardis cuts): these are
loaded as whole-chain snapshots and fitted in sequence with one ``Calibrator`` per model, one
fit per chain. Every underlying of an input is a data set of its own (``<input>-<UND>``).
Recordings of chain cuts hours apart (``shared/tools/csv_to_replay.py`` output) replay through
the live book, which drops quotes older than ``[book] stale_after_s``, and the trigger fires on
quote counts, mid-cut: ``--fit-on-gap 60`` fits once at the end of each cut instead, on the
quotes of that cut alone (a quote not refreshed since the previous cut counts as stale).

Per model and data set, over the accepted fits:

* ``fits`` / ``failed``: accepted fits, and fits the calibrator did not accept;
* ``quotes``: mean fitted quotes per fit (OTM, two-sided, after the calibrator's filters);
* ``in_band``: mean share of fitted quotes whose model IV lies inside the market's bid/ask IV;
* ``rmse mid``: median over fits of the fit's RMSE against the mid IV (vol points);
* ``mark rmse`` / ``mark med`` / ``mark p95``: RMSE, median and 95th percentile of
  |model IV - venue mark IV| over the fitted quotes (vol points; the venue's own smooth
  surface is the reference a trader sees);
* ``delta med``: median |our delta - venue delta|, ours the Black-76 delta ``N(d1)`` (puts
  ``N(d1) - 1``) at the model IV with the quote's own forward (DESIGN section 2);
* ``ATM jitter``: RMS of the change of ATM IV per expiry between consecutive accepted fits,
  expiries matched by venue code (vol points): model independent, so the models' stability
  can be compared on the same sequence (it also contains the market's own moves);
* ``ms p50`` / ``ms p95``: wall time of every fit.

The overall table pools every data set (quotes, fits and consecutive-fit pairs alike). Writes
``DIR/report.md`` and PNGs (``smile-<input>-<expiry>.png`` for a few expiries of the last
fit, ``params-<input>.png``: ATM IV per expiry over fits, ``inband-<input>.png``) and prints
the overall table.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from streamer.config import Config, load_config
from streamer.errors import StreamerError
from streamer.tools.report.plots import (
    iso_time,
    pick_expiries,
    plot_atm_panels,
    plot_series,
    plot_smile,
    safe_name,
    smile_of,
)

if TYPE_CHECKING:
    from streamer.book.snapshot import ChainSnapshot
    from streamer.daemon.pipeline import FitRecord, Pipeline

FloatArray = npt.NDArray[np.float64]

DEFAULT_MODELS = ("svi", "ssvi", "ssvi-rho", "essvi", "sabr", "heston", "bates")
CHAIN_UNDERLYINGS = ("BTC", "ETH")  # what the real chain CSVs hold
SMILES_PER_INPUT = 4
PARAM_PANELS = 6
# what a broken or unreadable input raises on the way in (KeyError: a missing CSV column)
INPUT_ERRORS: tuple[type[Exception], ...] = (
    StreamerError,
    OSError,
    ValueError,
    csv.Error,
    KeyError,
)


# ----------------------------------------------------------------- metrics
def atm_changes(seq: Sequence[Mapping[str, float]]) -> FloatArray:
    """Changes of ATM IV between consecutive fits, per expiry present (and finite) in both."""
    out: list[float] = []
    for prev, cur in itertools.pairwise(seq):
        for expiry, v in cur.items():
            p = prev.get(expiry)
            if p is not None and math.isfinite(p) and math.isfinite(v):
                out.append(v - p)
    return np.asarray(out, dtype=np.float64)


def rms(x: FloatArray) -> float:
    """Root mean square; NaN when empty."""
    return float(np.sqrt(np.mean(x * x))) if x.size else math.nan


def atm_jitter(seq: Sequence[Mapping[str, float]]) -> float:
    """RMS consecutive change of ATM IV (same units as the input; NaN without a pair)."""
    return rms(atm_changes(seq))


def fit_errors(record: FitRecord) -> tuple[FloatArray, FloatArray]:
    """(model IV - venue mark IV, our delta - venue delta) over the fitted quotes.

    Only quotes of the expiries the fit kept, and only where the venue sent the value. Our
    delta is Black-76 ``N(d1)`` (puts ``N(d1) - 1``) at the model IV with the quote's forward.
    """
    from streamer.pricing import black_greeks

    result, snap = record.result, record.snapshot
    prep = result.prepared
    empty = np.zeros(0)
    if prep is None or not result.success or result.fitted_iv.size != prep.data.n_quotes:
        return empty, empty
    data = prep.data
    kept = np.isin(np.asarray(data.slice_expiry, dtype=object), list(result.expiries))
    m = kept[data.slice_idx] if data.n_slices else np.zeros(0, dtype=np.bool_)
    q = prep.quote_index[m]
    iv = result.fitted_iv[m]
    mark_err = iv - snap.mark_iv[q]
    F = snap.forward[q]
    F = np.where(np.isfinite(F) & (F > 0), F, snap.forwards[snap.expiry_idx[q]])
    ours = np.asarray(black_greeks(F, snap.strike[q], snap.T[q], iv, snap.is_call[q]).delta)
    delta_err = ours - snap.venue_delta[q]
    return (
        np.asarray(mark_err[np.isfinite(mark_err)], dtype=np.float64),
        np.asarray(delta_err[np.isfinite(delta_err)], dtype=np.float64),
    )


@dataclass
class ModelStats:
    """What one model's fits on one data set gave (raw, so data sets can be pooled)."""

    fits: int = 0  # accepted
    failed: int = 0
    elapsed_ms: list[float] = field(default_factory=list)  # every fit
    ts_ms: list[int] = field(default_factory=list)  # accepted fits from here on
    in_band: list[float] = field(default_factory=list)
    rmse_iv: list[float] = field(default_factory=list)
    n_quotes: list[int] = field(default_factory=list)
    atm: list[dict[str, float]] = field(default_factory=list)
    mark_err: list[FloatArray] = field(default_factory=list)
    delta_err: list[FloatArray] = field(default_factory=list)

    def add(self, record: FitRecord) -> None:
        r = record.result
        self.elapsed_ms.append(r.elapsed_ms)
        if not r.success:
            self.failed += 1
            return
        self.fits += 1
        self.ts_ms.append(r.ts_ms)
        self.in_band.append(r.in_band)
        self.rmse_iv.append(r.rmse_iv)
        self.n_quotes.append(r.n_quotes)
        self.atm.append({s.expiry: s.atm_iv for s in r.slices})
        mark, delta = fit_errors(record)
        self.mark_err.append(mark)
        self.delta_err.append(delta)


@dataclass(frozen=True)
class Row:
    """One table row (vol-point metrics in vol points)."""

    fits: int
    failed: int
    quotes: float
    in_band: float
    rmse_mid: float
    mark_rmse: float
    mark_med: float
    mark_p95: float
    delta_med: float
    jitter: float
    ms_p50: float
    ms_p95: float


def _finite(values: Iterable[float]) -> FloatArray:
    a = np.asarray(list(values), dtype=np.float64)
    return a[np.isfinite(a)]


def _pct(a: FloatArray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else math.nan


def _mean(a: FloatArray) -> float:
    return float(np.mean(a)) if a.size else math.nan


def summarize(stats: Sequence[ModelStats]) -> Row:
    """Pool ``stats`` (one per data set) into one row; consecutive pairs stay within a set."""
    mark = np.concatenate([np.zeros(0), *(a for s in stats for a in s.mark_err)])
    delta = np.concatenate([np.zeros(0), *(a for s in stats for a in s.delta_err)])
    jumps = np.concatenate([np.zeros(0), *(atm_changes(s.atm) for s in stats)])
    ms = _finite(v for s in stats for v in s.elapsed_ms)
    return Row(
        fits=sum(s.fits for s in stats),
        failed=sum(s.failed for s in stats),
        quotes=_mean(_finite(float(n) for s in stats for n in s.n_quotes)),
        in_band=_mean(_finite(v for s in stats for v in s.in_band)),
        rmse_mid=_pct(_finite(v for s in stats for v in s.rmse_iv), 50) * 100,
        mark_rmse=rms(mark) * 100,
        mark_med=_pct(np.abs(mark), 50) * 100,
        mark_p95=_pct(np.abs(mark), 95) * 100,
        delta_med=_pct(np.abs(delta), 50),
        jitter=rms(jumps) * 100,
        ms_p50=_pct(ms, 50),
        ms_p95=_pct(ms, 95),
    )


COLUMNS = (
    ("fits", "fits", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("quotes", "quotes/fit", "{:.0f}"),
    ("in_band", "in_band", "{:.3f}"),
    ("rmse_mid", "rmse mid (vp)", "{:.3f}"),
    ("mark_rmse", "mark rmse (vp)", "{:.3f}"),
    ("mark_med", "mark med (vp)", "{:.3f}"),
    ("mark_p95", "mark p95 (vp)", "{:.3f}"),
    ("delta_med", "delta med", "{:.4f}"),
    ("jitter", "ATM jitter (vp)", "{:.3f}"),
    ("ms_p50", "ms p50", "{:.1f}"),
    ("ms_p95", "ms p95", "{:.1f}"),
)


def markdown_table(rows: Sequence[tuple[str, Row]], first: str = "model") -> str:
    """A Markdown table, one row per (name, row); NaN shows as ``-``."""
    head = "| " + " | ".join([first, *(title for _, title, _ in COLUMNS)]) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for name, row in rows:
        cells = [name]
        for attr, _, fmt in COLUMNS:
            v = getattr(row, attr)
            cells.append("-" if isinstance(v, float) and not math.isfinite(v) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- data sets
@dataclass
class Dataset:
    """One underlying of one input: every model's fits in sequence."""

    label: str
    source: str
    models: tuple[str, ...]
    stats: dict[str, ModelStats] = field(default_factory=dict)
    last: dict[str, FitRecord] = field(default_factory=dict)  # last accepted fit per model
    last_ts_ms: int = 0

    def add(self, record: FitRecord) -> None:
        self.stats.setdefault(record.model, ModelStats()).add(record)
        if record.result.success:
            self.last[record.model] = record
        self.last_ts_ms = max(self.last_ts_ms, record.snapshot.ts_ms)

    def last_records(self) -> dict[str, FitRecord]:
        """Each model's last accepted fit, in the command's model order."""
        return {m: self.last[m] for m in self.models if m in self.last}

    def final_expiries(self) -> list[str]:
        """Expiries of the models' last accepted fits, by expiry time."""
        when: dict[str, int] = {}
        for rec in self.last.values():
            for s in rec.result.slices:
                when[s.expiry] = s.expiry_ms
        return sorted(when, key=lambda e: (when[e], e))

    def final_time(self) -> str:
        return iso_time(self.last_ts_ms)

    def rows(self) -> list[tuple[str, Row]]:
        return [(m, summarize([self.stats.get(m, ModelStats())])) for m in self.models]


def input_label(path: str) -> str:
    """The file's name without its data suffixes (``.jsonl.zst``, ``.csv.gz`` ...)."""
    name = Path(path).name
    for suffix in (".zst", ".gz", ".jsonl", ".json", ".csv", ".txt"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def chain_snapshots(path: str) -> list[tuple[str, list[ChainSnapshot]]] | None:
    """(underlying, snapshots) of a real chain CSV ``load_chains`` knows; else None."""
    from streamer.errors import InputError
    from streamer.tools.chains import load_chains

    if not path.lower().endswith(".csv"):
        return None
    out = []
    for und in CHAIN_UNDERLYINGS:
        try:
            snaps = load_chains(path, und)
        except InputError:
            return None  # not one of those formats (e.g. a full Tardis options_chain file)
        if snaps:
            out.append((und, snaps))
    return out


def _records(
    path: str, models: Sequence[str], config: Config, fit_on_gap: float | None
) -> Iterator[FitRecord]:
    from streamer.calib.calibrator import CalibConfig, Calibrator
    from streamer.daemon.pipeline import FitRecord, Pipeline, make_model, run_inline
    from streamer.daemon.replay import items_of

    calib = {
        m: CalibConfig(penalty=config.models.penalty.get(m), objective=config.models.objective)
        for m in models
    }
    options = config.models.options()
    chains = chain_snapshots(path)
    if chains is not None:
        for _und, snaps in chains:
            cals = {m: Calibrator(make_model(m, options.get(m)), calib[m]) for m in models}
            for snap in snaps:
                for m, cal in cals.items():
                    yield FitRecord(snap.venue, snap.underlying, m, cal.fit(snap), snap)
        return
    pipeline = Pipeline.from_config(config, models=models, greeks=False)
    pipeline.keep_records = True
    if fit_on_gap is None:
        for _batch in run_inline(pipeline, items_of([path])):
            records, pipeline.records = pipeline.records, []
            yield from records
        return
    gap_ns = fit_on_gap * 1e9
    start: int | None = None  # receive time of the current cut's first item
    prev = 0
    for ts_ns, item in items_of([path]):
        if start is not None and ts_ns - prev >= gap_ns:
            yield from _fit_cut(pipeline, start, prev, fit_on_gap)
            start = None
        if isinstance(item, str | bytes):
            pipeline.on_frame(item, ts_ns)
        else:
            pipeline.on_event(item)
        start = ts_ns if start is None else start
        prev = ts_ns
    if start is not None:
        yield from _fit_cut(pipeline, start, prev, fit_on_gap)


def _fit_cut(pipeline: Pipeline, start_ns: int, end_ns: int, gap_s: float) -> list[FitRecord]:
    """Fit every changed book on the cut just ended: its own quotes, none of an older cut."""
    stale_s = (end_ns - start_ns) / 1e9 + min(1.0, 0.5 * gap_s)
    pipeline.books.stale_after_s = stale_s
    for book in pipeline.books:
        book.stale_after_s = stale_s
    for book in pipeline.pending():
        pipeline.fit_book(book, end_ns / 1e9)
    records, pipeline.records = pipeline.records, []
    return records


def collect(
    path: str, models: Sequence[str], config: Config, fit_on_gap: float | None = None
) -> list[Dataset]:
    """Fit every model on ``path`` (in sequence); one data set per (venue, underlying).

    ``fit_on_gap``: for recordings, fit at every pause of at least that many seconds in the
    receive times instead of when the config's trigger says (see ``add_gap_option``).
    """
    stem = input_label(path)
    sets: dict[tuple[str, str], Dataset] = {}
    for rec in _records(path, models, config, fit_on_gap):
        key = (rec.venue, rec.underlying)
        ds = sets.get(key)
        if ds is None:
            venue = "" if rec.venue == "deribit" else f"{rec.venue}-"
            ds = Dataset(f"{stem}-{venue}{rec.underlying}", path, tuple(models))
            sets[key] = ds
        ds.add(rec)
    return sorted(sets.values(), key=lambda d: d.label)


# ------------------------------------------------------------------- output
def plot_dataset(ds: Dataset, out: Path) -> list[Path]:
    """The data set's PNGs: a few smiles of the last fit, ATM IV and in_band over fits."""
    name = safe_name(ds.label)
    written: list[Path] = []
    last = ds.last_records()
    expiries = ds.final_expiries()
    for expiry in pick_expiries(expiries, SMILES_PER_INPUT):
        smile = smile_of(last, expiry, title=f"{ds.label} {expiry} ({ds.final_time()})")
        if smile is not None:
            path = out / f"smile-{name}-{safe_name(expiry)}.png"
            written.append(plot_smile(smile, path))
    if not last:
        return written
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for expiry in pick_expiries(expiries, PARAM_PANELS):
        series: dict[str, tuple[list[int], list[float]]] = {}
        for m in ds.models:
            st = ds.stats.get(m)
            if st is None:
                continue
            pts = [(t, a[expiry]) for t, a in zip(st.ts_ms, st.atm, strict=True) if expiry in a]
            if pts:
                series[m] = ([t for t, _ in pts], [v for _, v in pts])
        panels[expiry] = series
    written.append(
        plot_atm_panels(panels, out / f"params-{name}.png", title=f"{ds.label}: ATM IV per expiry")
    )
    inband = {m: (st.ts_ms, st.in_band) for m in ds.models if (st := ds.stats.get(m)) and st.fits}
    written.append(
        plot_series(
            inband,
            out / f"inband-{name}.png",
            title=f"{ds.label}: share of fitted quotes inside bid/ask",
            ylabel="in_band",
        )
    )
    return written


def render(
    datasets: Sequence[Dataset], models: Sequence[str], images: Mapping[str, list[Path]]
) -> str:
    """The whole ``report.md``."""
    overall = [(m, summarize([d.stats.get(m, ModelStats()) for d in datasets])) for m in models]
    lines = [
        "# streamer model report",
        "",
        f"Inputs: {', '.join(sorted({Path(d.source).name for d in datasets}))}. "
        "vp = vol points. Metrics: see `streamer report --help`.",
        "",
        "## Overall",
        "",
        markdown_table(overall),
    ]
    for ds in datasets:
        lines += [
            "",
            f"## {ds.label}",
            "",
            f"Source `{ds.source}`, last fit {ds.final_time()}.",
            "",
            markdown_table(ds.rows()),
        ]
        pngs = images.get(ds.label, [])
        if pngs:
            lines.append("")
            lines += [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- command
def setup(
    command: str, files: Sequence[str], model_args: Sequence[str] | None, config_path: str | None
) -> tuple[Config, list[str]] | None:
    """Config and models for ``report``/``plot``, or None after printing what is wrong."""
    from streamer.daemon import logs
    from streamer.models import REGISTRY

    try:
        config = load_config(config_path)
    except StreamerError as exc:
        print(f"streamer {command}: {exc}", file=sys.stderr)
        return None
    logs.configure("error", config.log.format)  # a failed fit is a row in the report
    for f in files:
        if not Path(f).is_file():
            print(f"streamer {command}: no such file: {f}", file=sys.stderr)
            return None
    if model_args:
        models = list(dict.fromkeys(model_args))
        bad = [m for m in models if m not in REGISTRY]
        if bad:
            print(
                f"streamer {command}: unknown model {bad[0]!r}; "
                f"allowed: {', '.join(sorted(REGISTRY))}",
                file=sys.stderr,
            )
            return None
    else:
        models = [m for m in DEFAULT_MODELS if m in REGISTRY]
    return config, models


def add_gap_option(p: argparse.ArgumentParser) -> None:
    """``--fit-on-gap S``: one fit per chain cut in recordings of cuts (csv_to_replay.py)."""
    p.add_argument(
        "--fit-on-gap",
        type=_positive,
        default=None,
        metavar="S",
        help="recordings: fit whenever the receive times pause for S seconds or more (and at "
        "the end) instead of on the config's trigger, each fit on the quotes received since "
        "the previous pause: one fit per chain cut for recordings made by csv_to_replay.py "
        "(S = 60 suits the shared data)",
    )


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return v
