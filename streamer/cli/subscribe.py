"""``streamer subscribe TOPIC``: a live view of what streamer publishes on MQTT.

Surface payloads (``streamer.surface/1``) print as a compact table per expiry (expiry, T,
forward, ATM IV in %, RMSE in IV points, share of quotes in the bid-ask band, parameters);
greeks payloads (``streamer.greeks/1``) as a short summary, status as one line; any other
payload as JSON. ``--json`` prints each message raw as ``{"topic": ..., "payload": ...}`` a
line (the ``jsonl`` publisher's format); ``--count N`` exits after N messages; ``--timeout S``
gives up (exit code 1) after S seconds. A broker that refuses us (credentials, ACL, TLS) is
an error (exit code 1) naming the broker. A password in ``--url`` is refused (exit code 2):
give it as ``STREAMER_MQTT_PASSWORD``, in a file named by ``STREAMER_MQTT_PASSWORD_FILE`` or as
the systemd credential ``mqtt_password``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

DEFAULT_URL = "mqtt://127.0.0.1:1883"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``subscribe`` command on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "subscribe",
        help="print what streamer publishes on MQTT (live)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("topic", help="MQTT topic, wildcards allowed (e.g. 'streamer/#')")
    p.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"broker, mqtt[s]://[user@]host:port ({DEFAULT_URL}); the password comes from "
        "STREAMER_MQTT_PASSWORD(_FILE) or the systemd credential mqtt_password, never argv",
    )
    p.add_argument("--json", action="store_true", help="print raw JSON lines")
    p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N messages")
    p.add_argument("--timeout", type=float, default=0.0, metavar="S", help="give up after S s")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the command; exit code 0 after ``--count`` messages or Ctrl-C, 1 on timeout/error,
    2 on bad arguments."""
    import structlog

    from streamer.errors import ConfigError, StreamerError
    from streamer.publish.urls import argv_password_error

    refusal = argv_password_error("--url", args.url)
    if refusal is not None:
        print(f"streamer subscribe: {refusal}", file=sys.stderr)
        return 2

    if not structlog.is_configured():  # keep stdout for the data
        from streamer.daemon import logs

        logs.configure("info", "auto")
    if args.count < 0:
        print("streamer subscribe: --count must be >= 0", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args.url, args.topic, args.json, args.count, args.timeout))
    except KeyboardInterrupt:
        return 0
    except ConfigError as exc:  # a bad URL, an unreadable password file
        print(f"streamer subscribe: {exc}", file=sys.stderr)
        return 2
    except StreamerError as exc:
        print(f"streamer subscribe: {exc}", file=sys.stderr)
        return 1


async def _run(url: str, topic: str, raw: bool, count: int, timeout: float) -> int:
    import orjson

    from streamer.client.render import render
    from streamer.client.subscribe import subscribe_payloads

    out = sys.stdout
    seen = 0
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            async with contextlib.aclosing(subscribe_payloads(url, topic)) as messages:
                async for msg_topic, payload in messages:
                    if raw:
                        line = orjson.dumps({"topic": msg_topic, "payload": payload})
                        out.write(line.decode() + "\n")
                    else:
                        out.write(render(msg_topic, payload) + "\n")
                    out.flush()
                    seen += 1
                    if count and seen >= count:
                        return 0
    except TimeoutError:
        print(f"streamer subscribe: timeout after {timeout} s ({seen} messages)", file=sys.stderr)
        return 1
    return 0
