"""``streamer run`` (the live daemon) and ``streamer record`` (the same, recording only).

Both run the service from a config until SIGTERM/SIGINT: ``run`` feeds, fits and publishes;
``record`` writes the feed's raw frames to ``DIR/*.jsonl.zst`` (DESIGN section 3) and fits and
publishes nothing. Exit codes: 0 after a clean stop, 1 after a fatal error, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

EXIT_USAGE = 2


def add_parser(sub: Any) -> None:
    """Register ``run`` and ``record`` on an argparse subparsers object."""
    run: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="the live daemon: feed -> book -> calibrate -> publish (from a config)",
        description="Run the daemon until SIGTERM/SIGINT. Config: see config/*.toml.",
    )
    run.add_argument("--config", metavar="C", help="TOML config (default: built-in defaults)")
    run.set_defaults(func=main)
    rec: argparse.ArgumentParser = sub.add_parser(
        "record",
        help="record the live feed's raw frames (no fitting, no publishing)",
        description="Record raw frames to DIR/*.jsonl.zst (DESIGN section 3) until stopped.",
    )
    rec.add_argument("--config", metavar="C", help="TOML config (feed and recorder sections)")
    rec.add_argument("--dir", metavar="DIR", help="where recordings go (else [recorder] dir)")
    rec.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the daemon (``args.command`` is ``run`` or ``record``)."""
    from streamer.config import load_config
    from streamer.daemon.service import serve_forever
    from streamer.errors import StreamerError

    command = args.command
    try:
        config = load_config(args.config)
    except StreamerError as exc:
        print(f"streamer {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if command == "run":
        return serve_forever(config, extra_publishers=_web(config))
    directory = args.dir or config.recorder.dir
    if not directory:
        print("streamer record: give --dir or set [recorder] dir", file=sys.stderr)
        return EXIT_USAGE
    config = dataclasses.replace(
        config,
        recorder=dataclasses.replace(config.recorder, dir=directory),
        publish=dataclasses.replace(config.publish, urls=()),
    )
    return serve_forever(config, record_only=True, command="record")


def _web(config: Any) -> list[Any]:
    """The live page inside the daemon when ``[web] listen`` is set (off by default)."""
    if not config.web.listen:
        return []
    from streamer.tools.web.publisher import WebPublisher

    web = config.web
    return [
        WebPublisher(
            listen=web.listen,
            prefix=config.publish.prefix,
            instance=config.instance,
            history=web.history,
            allow_remote=web.allow_remote,
        )
    ]
