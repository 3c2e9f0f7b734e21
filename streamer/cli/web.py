"""``streamer web``: a live page of the surfaces on the bus, or of a replay's output.

``--broker mqtt://HOST:PORT[/prefix]`` subscribes to ``{prefix}/#`` like any bot (retained
messages first, then live; it reconnects by itself) and serves a page on
``http://127.0.0.1:8808/`` (``--listen``) that updates live: per underlying and model, a
smile per expiry (bid-ask bars, mid, Deribit's mark, the fitted curve, the in-band share),
the ATM term structure and the tenors with their history over the session, parameter paths,
fit diagnostics and the status of every shard. ``--file OUT.jsonl`` serves the same page over
``streamer replay --out``'s file, with a time slider instead of live updates.

The page listens on loopback only; any other address needs ``--allow-remote`` and is logged
as a warning (the page has no login). A password in ``--broker`` is refused: give it as
``STREAMER_MQTT_PASSWORD`` (or ``_FILE``, or the systemd credential ``mqtt_password``).
Exit codes: 0 on Ctrl-C/SIGTERM, 1 when the broker refuses us, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

EXIT_FAILURE = 1
EXIT_USAGE = 2


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``web`` command on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "web",
        help="a live web page of the published surfaces (or of a replay's output)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--broker",
        metavar="URL",
        help="mqtt[s]://[user@]host:port[/prefix] (prefix default: streamer)",
    )
    src.add_argument("--file", metavar="OUT.jsonl", help="a replay's --out file (.gz/.zst too)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8808",
        metavar="HOST:PORT",
        help="where the page is served (default 127.0.0.1:8808; port 0: any free port)",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --listen address that is not loopback (the page has no login)",
    )
    p.add_argument(
        "--history",
        type=int,
        default=3000,
        metavar="N",
        help="surfaces (and tenors messages) kept per model for the history charts (3000)",
    )
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C/SIGTERM."""
    import structlog

    from streamer.errors import ConfigError, StreamerError
    from streamer.publish.urls import argv_password_error, parse_mqtt_url, redact
    from streamer.settings import is_loopback
    from streamer.tools.web.server import parse_listen

    if not structlog.is_configured():
        from streamer.daemon import logs

        logs.configure("info", "auto")
    log = structlog.get_logger("streamer.web")
    if args.history < 1:
        print("streamer web: --history must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        host, port = parse_listen(args.listen, allow_remote=args.allow_remote)
        prefix = None
        if args.broker is not None:
            refusal = argv_password_error("--broker", args.broker)
            if refusal is not None:
                print(f"streamer web: {refusal}", file=sys.stderr)
                return EXIT_USAGE
            prefix = parse_mqtt_url(args.broker).prefix
    except ConfigError as exc:
        print(f"streamer web: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not is_loopback(host):
        log.warning("web_listening_remote", host=host, port=port, hint="the page has no login")
    try:
        if args.broker is not None:
            assert prefix is not None
            source = redact(args.broker)
            return asyncio.run(_live(args.broker, source, prefix, host, port, args.history))
        return asyncio.run(_file(args.file, host, port))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"streamer web: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StreamerError as exc:  # the broker refused us
        print(f"streamer web: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _live(url: str, source: str, prefix: str, host: str, port: int, history: int) -> int:
    from streamer.tools.web.server import WebApp, follow, page_url, serve
    from streamer.tools.web.state import WebState

    state = WebState(prefix, history=history)
    app = WebApp.live(state, source=f"live from {source}")
    stop = _stop_event()
    runner, bound = await serve(app, host, port)
    try:
        print(f"streamer web: serving {page_url(host, bound)} (live from {source})", flush=True)
        async with asyncio.TaskGroup() as tg:
            feed = tg.create_task(follow(state, url), name="web-follow")
            waiter = tg.create_task(stop.wait(), name="web-stop")
            await asyncio.wait({feed, waiter}, return_when=asyncio.FIRST_COMPLETED)
            feed.cancel()
            waiter.cancel()
    except* Exception as group:  # the broker refused us: SubscribeError
        raise group.exceptions[0] from None
    finally:
        await runner.cleanup()
    return 0


async def _file(path: str, host: str, port: int) -> int:
    from streamer.tools.web.server import WebApp, page_url, serve
    from streamer.tools.web.timeline import Timeline

    print(f"streamer web: reading {path} ...", flush=True)
    timeline = await asyncio.to_thread(Timeline, path)
    try:
        if not timeline.keys:
            print(f"streamer web: no surfaces in {path}", file=sys.stderr)
            return EXIT_USAGE
        app = WebApp.replay(timeline)
        stop = _stop_event()
        runner, bound = await serve(app, host, port)
        try:
            steps = ", ".join(f"{'/'.join(k)}: {timeline.steps(k)}" for k in timeline.keys)
            print(f"streamer web: serving {page_url(host, bound)} ({path}; {steps})", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        timeline.close()
    return 0
