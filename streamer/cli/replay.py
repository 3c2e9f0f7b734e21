"""``streamer replay FILE...``: recorded feeds through the live code path (DESIGN section 4).

Inputs: recordings (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``), cryptofeed captures, and
Tardis ``options_chain`` CSV(.gz) files; the work is ``streamer.daemon.replay.replay``: frames
go parse -> book -> trigger -> calibrate -> publish, fitting inline whenever the trigger says
so (the clock is the recording's receive time, so every run makes the same fits), as fast as
possible or paced with ``--speed X``. ``--model none`` runs parse + book only.

Messages go to every ``--publish URL`` (``mqtt://``, ``mqtts://``, ``jsonl:PATH``,
``jsonl:-``) and to ``--out FILE`` (short for ``--publish jsonl:FILE``); with neither, to the
config's ``publish.urls`` (the default config: stdout). A progress bar (on a terminal) and the
summary table go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from streamer.config import load_config
from streamer.errors import StreamerError


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "replay",
        help="replay recorded feeds through parse, book, calibration and publishing",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="recordings or Tardis CSV files")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="M",
        help="model to fit (repeatable; 'none' = parse + book only; default: the config's)",
    )
    p.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="URL",
        help="mqtt://[user:pass@]host:port[/prefix], mqtts://..., jsonl:PATH, jsonl:- (stdout)",
    )
    p.add_argument("--out", metavar="OUT.jsonl", help="short for --publish jsonl:OUT.jsonl")
    p.add_argument(
        "--speed", type=float, default=None, metavar="X", help="pace at X times real time"
    )
    p.add_argument("--config", metavar="C", help="TOML config (default: built-in defaults)")
    p.add_argument("--no-greeks", action="store_true", help="publish surfaces only")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the command: 0 on success, 2 on bad arguments or config."""
    from streamer.daemon import logs
    from streamer.daemon.replay import replay

    try:
        config = load_config(args.config)
    except StreamerError as exc:
        print(f"streamer replay: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log.level, config.log.format)
    for f in args.files:
        if not Path(f).is_file():
            print(f"streamer replay: no such file: {f}", file=sys.stderr)
            return 2
    if args.speed is not None and not args.speed > 0:
        print("streamer replay: --speed must be positive", file=sys.stderr)
        return 2
    models = list(config.models.names) if args.model is None else list(args.model)
    if "none" in models:
        models = []
    urls = list(args.publish) + ([f"jsonl:{args.out}"] if args.out else [])
    if not urls:
        urls = list(config.publish.urls)
    try:
        summary = asyncio.run(
            replay(
                args.files,
                config,
                models=models,
                urls=urls,
                greeks=not args.no_greeks,
                speed=args.speed,
                progress=not args.quiet and sys.stderr.isatty(),
            )
        )
    except StreamerError as exc:
        print(f"streamer replay: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(summary, file=sys.stderr)
    return 0
