"""``streamer plot FILE``: fit a recording or chain CSV and plot each expiry's final smile.

The work is ``streamer.tools.report``; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from streamer.tools.report import plots as tool
from streamer.tools.report.collect import INPUT_ERRORS, add_gap_option, collect, setup
from streamer.tools.report.plots import plot_smile, safe_name, smile_of


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``plot`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "plot",
        help="fit a recording or chain CSV and plot each expiry's final smile (PNG)",
        description=(tool.__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="recording, Tardis CSV or real chain CSV")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="M",
        help="model to fit (repeatable; default: every registered one)",
    )
    p.add_argument("--out-dir", default=".", metavar="DIR", help="where the PNGs go (default .)")
    p.add_argument(
        "--expiry",
        action="append",
        default=None,
        metavar="E",
        help="only this expiry (venue code, e.g. 27DEC24; repeatable; default: all)",
    )
    p.add_argument("--config", metavar="C", help="TOML config (default: built-in defaults)")
    add_gap_option(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the command: 0 on success, 2 on bad arguments, input or config."""
    setup_ = setup("plot", [args.file], args.model, args.config)
    if setup_ is None:
        return 2
    config, models = setup_
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        datasets = collect(args.file, models, config, args.fit_on_gap)
    except INPUT_ERRORS as exc:
        print(f"streamer plot: {args.file}: {exc}", file=sys.stderr)
        return 2
    if not datasets:
        print(
            f"streamer plot: {args.file}: no option chain in it (nothing to fit)", file=sys.stderr
        )
        return 2
    wanted = set(args.expiry or ())
    have = {e for ds in datasets for e in ds.final_expiries()}
    if wanted - have:
        print(
            f"streamer plot: --expiry {', '.join(sorted(wanted - have))} not in the final "
            f"fits; there: {', '.join(sorted(have)) or 'none'}",
            file=sys.stderr,
        )
        return 2
    written: list[Path] = []
    for ds in datasets:
        last = ds.last_records()
        for expiry in ds.final_expiries():
            if wanted and expiry not in wanted:
                continue
            smile = smile_of(last, expiry, title=f"{ds.label} {expiry} ({ds.final_time()})")
            if smile is not None:
                path = out / f"smile-{safe_name(ds.label)}-{safe_name(expiry)}.png"
                written.append(plot_smile(smile, path))
    if not written:
        print(f"streamer plot: {args.file}: no accepted fit; nothing plotted", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0
