"""``streamer simulate``: a simulated Deribit recording with its ground truth.

The generator is ``streamer.tools.simulate``; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streamer.errors import InputError
from streamer.tools.simulate import (
    DEFAULT_RATE,
    DEFAULT_START,
    EXPIRY_ROLL_START,
    SCENARIOS,
    UNDERLYINGS,
    simulate,
    write,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``simulate`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="write a simulated Deribit recording from a known vol surface (+ ground truth)",
        description=(
            "Write a recording (DESIGN section 3) of Deribit frames generated from a known SSVI "
            "surface over Bates dynamics, and OUT's .truth.json sidecar with the ground truth. "
            "Same seed and arguments: the same bytes."
        ),
    )
    p.add_argument("--scenario", choices=SCENARIOS, default="calm")
    p.add_argument("--minutes", type=float, default=60.0, help="feed time to simulate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="PATH", help="x.jsonl[.zst|.gz]")
    p.add_argument("--underlying", default="BTC", choices=sorted(UNDERLYINGS))
    p.add_argument(
        "--start",
        metavar="ISO",
        help=f"feed start (default {DEFAULT_START}; expiry-roll {EXPIRY_ROLL_START})",
    )
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="ticker frames per second")
    p.add_argument("--zstd-level", type=int, default=19, help="zstd level of .zst output")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the command: 0 on success, 2 on bad arguments."""
    from streamer.daemon import logs

    logs.configure("warning")
    try:
        sim = simulate(
            args.scenario,
            args.minutes,
            args.seed,
            underlying=args.underlying,
            start=args.start,
            rate=args.rate,
        )
        res = write(sim, args.out, zstd_level=args.zstd_level)
    except InputError as exc:
        print(f"streamer simulate: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        feed_s = args.minutes * 60.0
        print(
            f"{res.path}: {res.frames:,} frames ({res.frames / feed_s:.1f}/s of feed time), "
            f"{res.bytes / 1e6:.2f} MB, {len(sim.chain.names)} options, "
            f"{res.seconds:.1f} s; truth: {res.truth_path}",
            file=sys.stderr,
        )
        if sim.injected:
            print(f"injected bad frames: {dict(sim.injected)}", file=sys.stderr)
    return 0
