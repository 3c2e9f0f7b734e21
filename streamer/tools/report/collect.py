"""``streamer report FILE...``: how well each model fits real chains, against the venue's marks.

Inputs: recordings (``.jsonl[.gz|.zst]``, replayed through parse -> book -> trigger ->
calibrators exactly as ``streamer replay`` does, see ``streamer.daemon.replay.items_of``),
Tardis ``options_chain`` CSVs, and the real chain CSVs that ``streamer.tools.chains.load_chains``
recognises by their header (``get_order_book`` dumps, full-chain snapshots, hourly Tardis cuts):
these are loaded as whole-chain snapshots and fitted in sequence with one ``Calibrator`` per
model, one fit per chain. Every underlying of an input is a data set of its own
(``<input>-<UND>``). Recordings of chain cuts hours apart (``shared/tools/csv_to_replay.py``
output) replay through the live book, which drops quotes older than ``[book] stale_after_s``,
and the trigger fires on quote counts, mid-cut: ``--fit-on-gap 60`` fits once at the end of
each cut instead, on the quotes of that cut alone (a quote not refreshed since the previous cut
counts as stale).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from streamer.config import Config, load_config
from streamer.errors import StreamerError
from streamer.tools.report.tables import Dataset

if TYPE_CHECKING:
    from streamer.book.snapshot import ChainSnapshot
    from streamer.daemon.pipeline import FitRecord, Pipeline
    from streamer.daemon.replay import Item

DEFAULT_MODELS = ("svi", "ssvi", "ssvi-rho", "essvi", "sabr", "heston", "bates")
CHAIN_UNDERLYINGS = ("BTC", "ETH")  # what the real chain CSVs hold
# what a broken or unreadable input raises on the way in (KeyError: a missing CSV column)
INPUT_ERRORS: tuple[type[Exception], ...] = (
    StreamerError,
    OSError,
    ValueError,
    csv.Error,
    KeyError,
)


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
    """Every fit of every model on ``path``: chain CSVs fitted snapshot by snapshot, anything
    else replayed through the pipeline."""
    from streamer.daemon.pipeline import Pipeline, run_inline
    from streamer.daemon.replay import items_of

    chains = chain_snapshots(path)
    if chains is not None:
        yield from _chain_records(chains, models, config)
        return
    pipeline = Pipeline.from_config(config, models=models, greeks=False)
    pipeline.keep_records = True
    if fit_on_gap is None:
        for _batch in run_inline(pipeline, items_of([path])):
            records, pipeline.records = pipeline.records, []
            yield from records
        return
    yield from _records_by_cut(pipeline, items_of([path]), fit_on_gap)


def _chain_records(
    chains: Iterable[tuple[str, list[ChainSnapshot]]], models: Sequence[str], config: Config
) -> Iterator[FitRecord]:
    """One fit per snapshot and model, one ``Calibrator`` per model and underlying."""
    from streamer.calib.calibrator import CalibConfig, Calibrator
    from streamer.daemon.pipeline import FitRecord, make_model
    from streamer.models import REGISTRY

    calib = {
        m: CalibConfig.for_model(REGISTRY[m], config.models.calib_overrides(m)) for m in models
    }
    options = config.models.options()
    for _und, snaps in chains:
        cals = {m: Calibrator(make_model(m, options.get(m)), calib[m]) for m in models}
        for snap in snaps:
            for m, cal in cals.items():
                yield FitRecord(snap.venue, snap.underlying, m, cal.fit(snap), snap)


def _records_by_cut(pipeline: Pipeline, items: Iterable[Item], gap_s: float) -> Iterator[FitRecord]:
    """The fits of ``--fit-on-gap``: one round per cut, a cut ending where the receive times
    pause for ``gap_s`` seconds or more (and at the end)."""
    gap_ns = gap_s * 1e9
    start: int | None = None  # receive time of the current cut's first item
    prev = 0
    for ts_ns, item in items:
        if start is not None and ts_ns - prev >= gap_ns:
            yield from _fit_cut(pipeline, start, prev, gap_s)
            start = None
        if isinstance(item, str | bytes):
            pipeline.on_frame(item, ts_ns)
        else:
            pipeline.on_event(item)
        start = ts_ns if start is None else start
        prev = ts_ns
    if start is not None:
        yield from _fit_cut(pipeline, start, prev, gap_s)


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
