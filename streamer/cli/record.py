"""``streamer record``: the live feed's raw frames to ``.jsonl.zst`` files, no fitting."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

EXIT_USAGE = 2


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``record`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "record",
        help="record the live feed's raw frames (no fitting, no publishing)",
        description="Record raw frames to DIR/*.jsonl.zst (DESIGN section 3) until stopped.",
    )
    p.add_argument("--config", metavar="C", help="TOML config (feed and recorder sections)")
    p.add_argument("--dir", metavar="DIR", help="where recordings go (else [recorder] dir)")
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
        print(f"streamer record: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
