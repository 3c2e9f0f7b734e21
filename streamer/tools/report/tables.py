"""The report's statistics and its Markdown tables.

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

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from streamer.daemon.pipeline import FitRecord

FloatArray = npt.NDArray[np.float64]


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


# ---------------------------------------------------------------- data sets
@dataclass
class Dataset:
    """One underlying of one input: every model's fits in sequence (``collect`` fills it)."""

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


def overall_rows(datasets: Sequence[Dataset], models: Sequence[str]) -> list[tuple[str, Row]]:
    """One row per model, every data set pooled."""
    return [(m, summarize([d.stats.get(m, ModelStats()) for d in datasets])) for m in models]


def iso_time(ts_ms: int) -> str:
    """``2026-01-05 04:11 UTC``."""
    return datetime.fromtimestamp(ts_ms / 1000.0, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------- Markdown
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


def render(
    datasets: Sequence[Dataset], models: Sequence[str], images: Mapping[str, list[Path]]
) -> str:
    """The whole ``report.md``."""
    lines = [
        "# streamer model report",
        "",
        f"Inputs: {', '.join(sorted({Path(d.source).name for d in datasets}))}. "
        "vp = vol points. Metrics: see `streamer report --help`.",
        "",
        "## Overall",
        "",
        markdown_table(overall_rows(datasets, models)),
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
