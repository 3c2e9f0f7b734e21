"""The ``streamer`` command line: one thin module per command, registered here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from streamer import __version__
from streamer.cli import (
    bench,
    fake_deribit,
    plot,
    replay,
    report,
    run,
    simulate,
    subscribe,
    train,
    web,
)

# run: also record
COMMANDS = (bench, run, replay, subscribe, simulate, report, plot, web, fake_deribit, train)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="streamer",
        description="Keeps crypto option volatility surfaces calibrated in real time.",
    )
    ap.add_argument("--version", action="version", version=f"streamer {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
