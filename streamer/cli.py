"""The ``streamer`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from streamer import __version__, subscribe_cmd

BENCHES: dict[str, str] = {
    "iv": "streamer.bench.iv",
    "mqtt": "streamer.bench.mqtt",
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHES[args.name])
    main: Callable[[list[str]], int] = module.main
    return main(list(args.rest))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="streamer",
        description="Keeps crypto option volatility surfaces calibrated in real time.",
    )
    ap.add_argument("--version", action="version", version=f"streamer {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser("bench", help="run a benchmark and print its table")
    bench.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(func=_bench)
    subscribe_cmd.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
