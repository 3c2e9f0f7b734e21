"""``streamer fake-deribit FILE...``: recordings served as a live Deribit websocket on loopback.

Try the whole system with no exchange and no network: the files (our ``.jsonl[.gz|.zst]``
recordings such as ``replay_data/*.jsonl.zst``, cryptofeed captures, Tardis ``options_chain``
CSVs, a user's own ``streamer record`` output) are replayed by the package's fake Deribit
server (``streamer.feeds.deribit.fake.RecordingServer``), which speaks the real JSON-RPC v2
protocol: ``public/get_instruments`` from the recording's listings and tickers, subscriptions
honoured, heartbeats, frames paced at the recorded speed times ``--speed``. Point the daemon's
``feed.url`` at the address it prints (``config/fake-deribit.toml`` does, for port 8765)::

    streamer fake-deribit replay_data/calm.jsonl.zst --loop
    streamer run --config config/fake-deribit.toml

``--loop`` starts over when the files end, with every timestamp moved on by the recording's
length, so time keeps running forward; without it the server closes its connections and
exits when the files end. It listens on 127.0.0.1 only. Exit codes: 0 at the end or on Ctrl-C,
2 on bad arguments (a missing file, a file with no Deribit notification, a busy port).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

DEFAULT_PORT = 8765
EXIT_USAGE = 2


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``fake-deribit`` command on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "fake-deribit",
        help="serve recordings as a live Deribit websocket on loopback (try it all offline)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="recordings or Tardis CSVs, in order")
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="pace: X times the recorded speed (default 1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        metavar="P",
        help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0: any free port)",
    )
    p.add_argument("--loop", action="store_true", help="start over when the files end")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the server until the files end (without ``--loop``) or Ctrl-C."""
    import structlog

    from streamer.errors import StreamerError
    from streamer.feeds.deribit.fake import RecordingIndex

    if not structlog.is_configured():
        from streamer.daemon import logs

        logs.configure("info", "auto")
    if not args.speed > 0:
        print("streamer fake-deribit: --speed must be positive", file=sys.stderr)
        return EXIT_USAGE
    if not 0 <= args.port <= 65535:
        print("streamer fake-deribit: --port must lie in [0, 65535]", file=sys.stderr)
        return EXIT_USAGE
    try:
        index = RecordingIndex.scan(args.files)
    except (StreamerError, OSError) as exc:
        print(f"streamer fake-deribit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_serve(index, args.speed, args.port, args.loop))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # the port is taken
        print(f"streamer fake-deribit: cannot listen on port {args.port}: {exc}", file=sys.stderr)
        return EXIT_USAGE


async def _serve(index: Any, speed: float, port: int, loop: bool) -> int:
    from streamer.feeds.deribit.fake import RecordingServer

    minutes = (index.last_ns - index.first_ns) / 60e9
    async with RecordingServer(index, speed=speed, loop=loop, port=port) as server:
        print(
            f"streamer fake-deribit: {index.notifications:,} notifications, "
            f"{len(index.initial):,} instruments, {minutes:.1f} min recorded, "
            f"speed {speed:g}{', looping' if loop else ''}",
            flush=True,
        )
        print(f"serving {server.url}", flush=True)
        print(f"point the daemon at it: [feed] url = {server.url!r}", flush=True)
        await server.finished.wait()
    return 0
