"""``streamer run``: the live daemon, from a config, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_USAGE = 2


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``run`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="the live daemon: feed -> book -> calibrate -> publish (from a config)",
        description="Run the daemon until SIGTERM/SIGINT. Config: see config/*.toml.",
    )
    p.add_argument("--config", metavar="C", help="TOML config (default: built-in defaults)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """0 after a clean stop, 1 after a fatal error, 2 on a bad config."""
    from streamer.config import load_config
    from streamer.daemon.service import serve_forever
    from streamer.errors import StreamerError

    try:
        config = load_config(args.config)
    except StreamerError as exc:
        print(f"streamer run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return serve_forever(config)
