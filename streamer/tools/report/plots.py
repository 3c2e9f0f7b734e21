"""``streamer plot FILE``: the fitted smiles of a replay's final state, one PNG per expiry.

The input (a recording, a Tardis ``options_chain`` CSV, or one of the real chain CSVs that
``streamer.tools.chains.load_chains`` reads) is replayed or loaded and every model is fitted
exactly as ``streamer report`` does (``streamer.tools.report.collect``). For each expiry of the
final state one PNG shows the market's fitted quotes (OTM, two-sided) as bid/ask implied-vol
bars with their mid, the venue's mark IV where it sent one, and each model's fitted smile,
against log-moneyness ``k = ln(K/F)``. Files: ``DIR/smile-<input>-<expiry>.png``.

This module also holds the plots of ``streamer report`` (``plot_dataset``: smiles, ATM IV and
in-band share over fits). matplotlib (the ``plot`` extra) is imported lazily with the
non-interactive ``Agg`` backend, so the rest of the package never needs it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from streamer.tools.report.tables import Dataset

if TYPE_CHECKING:
    from streamer.client.surface import Surface
    from streamer.daemon.pipeline import FitRecord, Pipeline

FloatArray = npt.NDArray[np.float64]
Series = tuple[Sequence[int], Sequence[float]]  # (ts_ms, values)

SMILE_GRID = 161  # points of each model's curve
K_MARGIN = 0.15  # the curve extends this share of the quoted k span beyond each end
SMILES_PER_INPUT = 4
PARAM_PANELS = 6


# ------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Smile:
    """One expiry's market quotes (IVs as fractions) and each model's fitted curve."""

    title: str
    expiry: str
    k: FloatArray  # ln(K/F) of the fitted quotes
    bid: FloatArray
    ask: FloatArray
    mid: FloatArray
    mark: FloatArray  # the venue's mark IV, NaN where none
    curves: dict[str, tuple[FloatArray, FloatArray]] = field(default_factory=dict)  # (k, iv)


@cache
def _payload_builder() -> Pipeline:
    from streamer.daemon.pipeline import Pipeline

    return Pipeline(models=(), greeks=False)


def surface_of(record: FitRecord) -> Surface:
    """The fitted surface exactly as it would be published (rebuilt from its payload)."""
    from streamer.client.surface import Surface

    payload = _payload_builder().surface_message(
        record.snapshot, record.model, record.result, seq=0
    )
    return Surface.from_payload(payload)


def smile_of(records: Mapping[str, FitRecord], expiry: str, title: str = "") -> Smile | None:
    """``expiry``'s smile from accepted fits (model -> record); None when no fit has it.

    The market quotes are those fitted on the newest snapshot among the records (the first
    such model's, in ``records`` order); every model that has the expiry adds its curve (its
    last accepted fit, which is what it publishes) over the quoted k range.
    """
    market: Smile | None = None
    newest_first = sorted(records.values(), key=lambda r: -r.snapshot.ts_ms)  # stable
    for rec in newest_first:
        prep = rec.result.prepared
        if prep is None or expiry not in rec.result.expiries or expiry not in prep.expiries:
            continue
        d = prep.data
        m = d.slice_idx == prep.expiries.index(expiry)
        q = prep.quote_index[m]
        market = Smile(
            title=title or expiry,
            expiry=expiry,
            k=d.k[m],
            bid=d.iv_bid[m],
            ask=d.iv_ask[m],
            mid=d.iv[m],
            mark=np.asarray(rec.snapshot.mark_iv[q], dtype=np.float64),
        )
        break
    if market is None or market.k.size == 0:
        return None
    lo, hi = float(np.min(market.k)), float(np.max(market.k))
    span = max(hi - lo, 0.05)
    grid = np.linspace(lo - K_MARGIN * span, hi + K_MARGIN * span, SMILE_GRID)
    for name, rec in records.items():
        if expiry not in rec.result.expiries:
            continue
        surface = surface_of(rec)
        j = surface.expiries.index(expiry)
        iv = surface.iv(surface.forward[j] * np.exp(grid), expiry)
        market.curves[name] = (grid, iv)
    return market


def pick_expiries(expiries: Sequence[str], n: int = 4) -> list[str]:
    """Up to ``n`` expiries spread from the first to the last (order kept)."""
    if len(expiries) <= n:
        return list(expiries)
    idx = sorted({round(i * (len(expiries) - 1) / (n - 1)) for i in range(n)})
    return [expiries[i] for i in idx]


def safe_name(text: str) -> str:
    """``text`` usable in a file name (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# ------------------------------------------------------------------- drawing
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def _figure(path: Path, *args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(*args, **kwargs)``, saved to ``path`` (tight layout, 100 dpi) when the
    block ends without an error; closed in any case."""
    plt = _pyplot()
    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _lines(ax: Any, series: Mapping[str, Series], by_time: bool, scale: float) -> None:
    """One ``o-`` line per name: ``values * scale`` over time (or fit number)."""
    for name, (ts, values) in series.items():
        v = np.asarray(values, dtype=np.float64) * scale
        ax.plot(_x(ts, by_time), v, "o-", ms=2.5, lw=1.0, label=name)


def _x_axis(all_ts: Sequence[int]) -> tuple[bool, str]:
    """Time on the x axis, unless every fit has one time stamp (then the fit number)."""
    by_time = len(all_ts) > 1 and max(all_ts) > min(all_ts)
    return by_time, "fit time (UTC)" if by_time else "fit number"


def _x(ts_ms: Sequence[int], by_time: bool) -> list[datetime] | list[int]:
    if by_time:
        return [datetime.fromtimestamp(t / 1000.0, tz=UTC) for t in ts_ms]
    return list(range(1, len(ts_ms) + 1))


def plot_smile(smile: Smile, path: Path) -> Path:
    """Bid/ask IV bars, mid dots, mark dots and each model's curve (vol points vs k)."""
    with _figure(path, figsize=(9, 5.5)) as (_, ax):
        ax.vlines(
            smile.k, smile.bid * 100, smile.ask * 100, color="0.55", lw=1.6, label="market bid/ask"
        )
        ax.plot(smile.k, smile.mid * 100, "o", color="0.25", ms=3, label="market mid")
        has_mark = np.isfinite(smile.mark)
        if has_mark.any():
            ax.plot(
                smile.k[has_mark],
                smile.mark[has_mark] * 100,
                "x",
                color="tab:red",
                ms=4,
                label="venue mark",
            )
        for name, (k, iv) in smile.curves.items():
            ok = np.isfinite(iv)
            ax.plot(k[ok], iv[ok] * 100, "-", lw=1.4, label=name)
        lo = np.nanmin(smile.bid) * 100
        hi = np.nanmax(smile.ask) * 100
        if math.isfinite(lo) and math.isfinite(hi):
            pad = 0.15 * max(hi - lo, 2.0)
            ax.set_ylim(max(lo - pad, 0.0), hi + pad)
        ax.set_xlabel("log-moneyness k = ln(K/F)")
        ax.set_ylabel("implied vol (vol points)")
        ax.set_title(smile.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return path


def plot_series(
    series: Mapping[str, Series],
    path: Path,
    *,
    title: str,
    ylabel: str,
    scale: float = 1.0,
) -> Path:
    """One line per name: ``(ts_ms, values)`` over time."""
    by_time, xlabel = _x_axis([t for ts, _ in series.values() for t in ts])
    with _figure(path, figsize=(9, 4.5)) as (fig, ax):
        _lines(ax, series, by_time, scale)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        fig.autofmt_xdate()
    return path


def plot_atm_panels(
    panels: Mapping[str, Mapping[str, Series]],
    path: Path,
    *,
    title: str,
) -> Path:
    """One panel per expiry, one line per model: ATM IV (vol points) over fits."""
    n = max(len(panels), 1)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    by_time, xlabel = _x_axis([t for s in panels.values() for ts, _ in s.values() for t in ts])
    size = (6 * cols, 3.2 * rows)
    with _figure(path, rows, cols, figsize=size, squeeze=False) as (fig, axes):
        for ax, (expiry, series) in zip(axes.flat, panels.items(), strict=False):
            _lines(ax, series, by_time, 100.0)
            ax.set_title(expiry, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("ATM IV (vol pts)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.suptitle(title)
    return path


# ------------------------------------------------------------------ report
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
    panels = {e: atm_series(ds, e) for e in pick_expiries(expiries, PARAM_PANELS)}
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


def atm_series(ds: Dataset, expiry: str) -> dict[str, Series]:
    """Per model (that has it), ``expiry``'s ATM IV over the accepted fits."""
    series: dict[str, Series] = {}
    for m in ds.models:
        st = ds.stats.get(m)
        if st is None:
            continue
        pts = [(t, a[expiry]) for t, a in zip(st.ts_ms, st.atm, strict=True) if expiry in a]
        if pts:
            series[m] = ([t for t, _ in pts], [v for _, v in pts])
    return series
