"""``streamer report FILE...``: fit every model on recordings or chain CSVs; a Markdown report.

The work is ``streamer.tools.report``; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from streamer.tools.report import collect as collect_doc
from streamer.tools.report import tables as tables_doc
from streamer.tools.report.collect import (
    DEFAULT_MODELS,
    INPUT_ERRORS,
    add_gap_option,
    collect,
    setup,
)
from streamer.tools.report.plots import plot_dataset
from streamer.tools.report.tables import Dataset, markdown_table, overall_rows, render


def _description() -> str:
    """The help text: what goes in (``collect``), what comes out (``tables``)."""
    parts = [(m.__doc__ or "").split("\n\n", 1)[1].strip() for m in (collect_doc, tables_doc)]
    return "\n\n".join(parts) + "\n"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``report`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "report",
        help="fit every model on recordings or chain CSVs; Markdown report and PNGs",
        description=_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="recordings, Tardis or chain CSVs")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="M",
        help=f"model to fit (repeatable; default: those of {', '.join(DEFAULT_MODELS)} "
        "that are registered)",
    )
    p.add_argument("--out-dir", default="report", metavar="DIR", help="output (default ./report)")
    p.add_argument("--config", metavar="C", help="TOML config (default: built-in defaults)")
    add_gap_option(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the command: 0 on success, 2 on bad arguments, inputs or config."""
    setup_ = setup("report", args.files, args.model, args.config)
    if setup_ is None:
        return 2
    config, models = setup_
    out = Path(args.out_dir)
    datasets: list[Dataset] = []
    images: dict[str, list[Path]] = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"streamer report: --out-dir: {exc}", file=sys.stderr)
        return 2
    for path in args.files:
        t0 = time.perf_counter()
        try:
            found = collect(path, models, config, args.fit_on_gap)
        except INPUT_ERRORS as exc:
            print(f"streamer report: {path}: {exc}", file=sys.stderr)
            return 2
        fits = sum(s.fits + s.failed for d in found for s in d.stats.values())
        print(
            f"streamer report: {path}: {len(found)} data set(s), {fits} fits "
            f"in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        if not found:
            print(
                f"streamer report: {path}: no option chain in it (nothing to fit)", file=sys.stderr
            )
            return 2
        for ds in found:
            base, n = ds.label, 1
            while ds.label in images:  # two inputs of one name
                n += 1
                ds.label = f"{base}-{n}"
            images[ds.label] = plot_dataset(ds, out)
        datasets += found
    (out / "report.md").write_text(render(datasets, models, images), encoding="utf-8")
    print(markdown_table(overall_rows(datasets, models)))
    print(f"streamer report: wrote {out / 'report.md'}", file=sys.stderr)
    return 0
