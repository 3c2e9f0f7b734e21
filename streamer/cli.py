"""The ``streamer`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from streamer import __version__, logs, plot, replay_cmd, report, simulate, subscribe_cmd
from streamer.config import Config, load_config
from streamer.errors import StreamerError

BENCHES: dict[str, str] = {
    "iv": "streamer.bench.iv",
    "mqtt": "streamer.bench.mqtt",
    "replay": "streamer.bench.replay",
    "calib": "streamer.bench.calib",
    "quality": "streamer.bench.quality",
    "latency": "streamer.bench.latency",
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    logs.configure("warning")  # the tables go to stdout; only problems to stderr
    module = importlib.import_module(BENCHES[args.name])
    main: Callable[[list[str]], int] = module.main
    return main(list(args.rest))


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return load_config(args.config)
    except StreamerError as exc:
        print(f"streamer {args.command}: {exc}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from streamer import logs
    from streamer.service import Service

    config = _load(args)
    if config is None:
        return 2
    logs.configure(config.log.level, config.log.format)
    try:
        return asyncio.run(Service(config).run())
    except StreamerError as exc:
        print(f"streamer run: {exc}", file=sys.stderr)
        return 2


def _record(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    from streamer import logs
    from streamer.service import Service

    config = _load(args)
    if config is None:
        return 2
    directory = args.dir or config.recorder.dir
    if not directory:
        print("streamer record: give --dir or set [recorder] dir", file=sys.stderr)
        return 2
    config = dataclasses.replace(
        config,
        recorder=dataclasses.replace(config.recorder, dir=directory),
        publish=dataclasses.replace(config.publish, urls=()),
    )
    logs.configure(config.log.level, config.log.format)
    try:
        return asyncio.run(Service(config, record_only=True).run())
    except StreamerError as exc:
        print(f"streamer record: {exc}", file=sys.stderr)
        return 2


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
    run = sub.add_parser(
        "run",
        help="the live daemon: feed -> book -> calibrate -> publish (from a config)",
        description="Run the daemon until SIGTERM/SIGINT. Config: see config/*.toml.",
    )
    run.add_argument("--config", metavar="C", help="TOML config (default: built-in defaults)")
    run.set_defaults(func=_run)
    rec = sub.add_parser(
        "record",
        help="record the live feed's raw frames (no fitting, no publishing)",
        description="Record raw frames to DIR/*.jsonl.zst (DESIGN section 3) until stopped.",
    )
    rec.add_argument("--config", metavar="C", help="TOML config (feed and recorder sections)")
    rec.add_argument("--dir", metavar="DIR", help="where recordings go (else [recorder] dir)")
    rec.set_defaults(func=_record)
    replay_cmd.add_parser(sub)
    subscribe_cmd.add_parser(sub)
    simulate.add_parser(sub)
    report.add_parser(sub)
    plot.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
