"""``streamer bench NAME [options]``: run one benchmark and print its table."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

BENCHES: dict[str, str] = {
    "iv": "streamer.tools.bench.iv",
    "mqtt": "streamer.tools.bench.mqtt",
    "replay": "streamer.tools.bench.replay",
    "live": "streamer.tools.bench.live",
    "calib": "streamer.tools.bench.calib",
    "quality": "streamer.tools.bench.quality",
    "latency": "streamer.tools.bench.latency",
}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser("bench", help="run a benchmark and print its table")
    p.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from streamer.daemon import logs

    logs.configure("warning")  # the tables go to stdout; only problems to stderr
    module = importlib.import_module(BENCHES[args.name])
    run: Callable[[list[str]], int] = module.main
    return run(list(args.rest))
