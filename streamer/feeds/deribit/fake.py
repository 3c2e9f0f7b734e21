"""A fake Deribit websocket server on loopback, speaking the real JSON-RPC v2 protocol.

Like httpx's ``MockTransport`` this is package code, not a test helper: feed tests, service
tests and ``streamer simulate``-style demos start it on ``127.0.0.1`` port 0 and point a
``DeribitFeed`` at its ``url``.

What it answers (shapes as in the Deribit API v2 docs and the real capture in
``shared/data/deribit/raw``): ``public/set_heartbeat``, ``public/get_instruments`` (from a list
of instrument dicts, filtered by currency/kind/expired), ``public/subscribe`` and
``public/unsubscribe`` (the result lists the channels accepted; unknown instruments are left
out; a request with more than ``max_channels`` channels is refused with -32600 "request entity
too large", without an id as the real server does unless ``refusal_with_id``), ``public/test``
(answers a heartbeat ``test_request``). Unknown methods get -32601. A book channel subscribed
again on the same connection starts with a snapshot (the levels of the last snapshot pushed,
the last change_id), as Deribit sends a fresh snapshot on every new book subscription.

What it pushes: once a connection subscribed its first instrument channel (or ``start_when``
holds), the ``script`` of
notifications (``ScriptFrame``: a channel prefix and a data dict; by default the real 2021
ticker/book frames of the capture, else synthetic tickers) is replayed ``loops`` times, each frame
sent on the subscribed channel it matches (``ticker.X`` goes out as ``ticker.X.100ms`` if that is
what the client subscribed) and skipped when nothing matches. ``push``/``push_raw`` inject frames
on demand (instrument.state listings, book gaps, garbage); ``send_test_request`` sends a heartbeat
``test_request``, and ``ConnectionLog`` records whether it was answered.

Fault knobs (they apply to the first ``faulty_connections`` connections; None: all):
``drop_after_frames`` (abort the TCP connection after N script frames), ``stall_after_frames``
(stop sending anything, replies included, without closing), ``garbage_frames`` (sent before the
script), ``rate_limit_after_requests`` (every later request gets error 10028
``too_many_requests``), ``test_request_every_s`` (periodic ``test_request``; with
``close_unanswered`` the connection is closed when the previous one is still unanswered, like
Deribit). Every connection's traffic is kept in ``connections`` (requests, per-channel subscribe
counts, frames sent) for assertions; ``wait_until`` waits for a condition on them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from streamer.errors import InputError

log = structlog.get_logger(__name__)

DEFAULT_MAX_CHANNELS = 500
TOO_MANY_REQUESTS = 10028
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
CAPTURE_WS = "raw/cryptofeed-DERIBIT.ws.1.0"
CAPTURE_INSTRUMENTS = "raw/cryptofeed-DERIBIT.0"
TEST_REQUEST = '{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"test_request"}}'
HEARTBEAT = '{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"heartbeat"}}'
_INSTRUMENT_KINDS = ("ticker", "book", "trades", "markprice", "incremental_ticker")


@dataclass(frozen=True, slots=True)
class ScriptFrame:
    """One notification to push: sent on the subscribed channel equal to ``channel`` or
    starting with ``channel + "."`` (``ticker.BTC-24SEP21-8000-P`` matches
    ``ticker.BTC-24SEP21-8000-P.100ms``)."""

    channel: str
    data: Mapping[str, Any]


def notification(channel: str, data: Mapping[str, Any]) -> str:
    """A subscription notification frame as Deribit sends it."""
    return json.dumps(
        {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": channel, "data": data}},
        separators=(",", ":"),
    )


def default_data_dir() -> Path | None:
    """``$STREAMER_DERIBIT_DATA``, else ``../shared/data/deribit`` next to a source checkout."""
    env = os.environ.get("STREAMER_DERIBIT_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "shared/data/deribit"
    return path if path.is_dir() else None


def _capture_payloads(path: Path) -> Iterable[tuple[str, Any]]:
    """(prefix, decoded JSON) for every ``prefix: {json}`` line of a cryptofeed capture."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            head, sep, body = line.partition(": ")
            if not sep or not body.startswith("{"):
                continue
            try:
                yield head, json.loads(body)
            except ValueError:
                continue


def instruments_from_capture(path: Path) -> list[dict[str, Any]]:
    """The instrument dicts of the ``get_instruments`` responses in a cryptofeed capture."""
    out: list[dict[str, Any]] = []
    for head, payload in _capture_payloads(path):
        if "get_instruments" in head and isinstance(payload.get("result"), list):
            out.extend(payload["result"])
    return out


def script_from_capture(path: Path, kinds: Sequence[str] = ("ticker", "book")) -> list[ScriptFrame]:
    """The capture's notifications of the given channel kinds, in order, each keyed by its
    channel without the interval (``ticker.BTC-24SEP21-8000-P``) so it replays on whatever
    interval a client subscribes."""
    out: list[ScriptFrame] = []
    for head, payload in _capture_payloads(path):
        if "->" in head or payload.get("method") != "subscription":
            continue
        channel = str(payload["params"]["channel"])
        parts = channel.split(".")
        if parts[0] in kinds and len(parts) >= 3:
            out.append(ScriptFrame(f"{parts[0]}.{parts[1]}", payload["params"]["data"]))
    return out


def synthetic_instruments() -> list[dict[str, Any]]:
    """A small BTC/ETH option list (expiries in 2031) for when the real capture is absent."""
    out: list[dict[str, Any]] = []
    expiry_ms = 1_925_193_600_000  # Friday 2031-01-03 08:00 UTC
    for cur, strikes in (("BTC", (40_000.0, 50_000.0, 60_000.0)), ("ETH", (2_000.0, 3_000.0))):
        for strike in strikes:
            for typ in ("call", "put"):
                name = f"{cur}-3JAN31-{int(strike)}-{typ[0].upper()}"
                out.append(
                    {
                        "instrument_name": name,
                        "kind": "option",
                        "base_currency": cur,
                        "quote_currency": cur,
                        "settlement_currency": cur,
                        "option_type": typ,
                        "strike": strike,
                        "expiration_timestamp": expiry_ms,
                        "creation_timestamp": 1_700_000_000_000,
                        "tick_size": 0.0005,
                        "contract_size": 1.0,
                        "min_trade_amount": 0.1,
                        "is_active": True,
                        "settlement_period": "month",
                    }
                )
    return out


def synthetic_ticker(instrument: Mapping[str, Any], ts_ms: int, step: int = 0) -> dict[str, Any]:
    """A plausible ticker payload for one instrument dict (prices in coin, IVs in percent)."""
    forward = 50_000.0 if instrument["base_currency"] == "BTC" else 2_500.0
    bid = round(0.05 + 0.0005 * step, 4)
    return {
        "timestamp": ts_ms,
        "instrument_name": instrument["instrument_name"],
        "state": "open",
        "best_bid_price": bid,
        "best_bid_amount": 10.0,
        "best_ask_price": round(bid + 0.001, 4),
        "best_ask_amount": 12.0,
        "bid_iv": 60.0,
        "ask_iv": 62.0,
        "mark_iv": 61.0,
        "mark_price": round(bid + 0.0005, 5),
        "underlying_price": forward,
        "underlying_index": f"{instrument['base_currency']}-3JAN31",
        "index_price": forward * 0.99,
        "open_interest": 100.0,
        "interest_rate": 0.0,
        "greeks": {"delta": 0.5, "gamma": 0.0001, "vega": 50.0, "theta": -10.0, "rho": 1.0},
        "stats": {"volume": 1.0, "price_change": 0.0, "low": bid, "high": bid},
    }


def synthetic_script(
    instruments: Sequence[Mapping[str, Any]], rounds: int = 3, ts0_ms: int = 1_700_000_000_000
) -> list[ScriptFrame]:
    """``rounds`` ticker frames per instrument, instrument after instrument."""
    return [
        ScriptFrame(
            f"ticker.{inst['instrument_name']}", synthetic_ticker(inst, ts0_ms + 100 * k, k)
        )
        for k in range(rounds)
        for inst in instruments
    ]


@dataclass
class ConnectionLog:
    """Everything one client connection did, for assertions."""

    index: int
    requests: list[dict[str, Any]] = field(default_factory=list)
    subscribe_counts: Counter[str] = field(default_factory=Counter)
    unsubscribe_counts: Counter[str] = field(default_factory=Counter)
    subscribed: set[str] = field(default_factory=set)
    sent: list[str] = field(default_factory=list)  # every frame sent, replies included
    notifications: list[str] = field(default_factory=list)  # pushed notification frames
    script_frames: int = 0  # script frames sent (what drop/stall count)
    heartbeat_interval: float | None = None
    test_requests_sent: int = 0
    test_requests_answered: int = 0
    refused_requests: int = 0  # subscribe lists refused for being too long
    rate_limited_requests: int = 0
    closed_by_server: str = ""  # "drop", "unanswered test_request"
    stalled: bool = False
    open: bool = True

    def methods(self) -> list[str]:
        return [str(r.get("method")) for r in self.requests]


class _Conn:
    """A live connection and its pending state."""

    def __init__(self, ws: ServerConnection, log_: ConnectionLog, faulty: bool) -> None:
        self.ws = ws
        self.log = log_
        self.faulty = faulty
        self.unanswered = 0
        self.ready = asyncio.Event()  # the script may start
        self.by_prefix: dict[str, str] = {}  # "ticker.X" -> "ticker.X.100ms"
        self.snapshots: dict[str, Mapping[str, Any]] = {}  # "book.X" -> last snapshot pushed
        self.change_ids: dict[str, object] = {}  # "book.X" -> last change_id pushed
        self.ever_subscribed: set[str] = set()


class FakeDeribitServer:
    """A Deribit websocket server on 127.0.0.1 (``async with FakeDeribitServer() as srv``).

    Args:
        instruments: instrument dicts as ``public/get_instruments`` returns them (default: the
            real capture under ``default_data_dir()`` if present, else ``synthetic_instruments``).
        script: notifications to replay after the first instrument subscription (default: the
            capture's ticker and book frames, else ``synthetic_script(instruments)``).
        loops: replay the script this many times (None: forever).
        interval_s: pause between script frames (0: just yield to the event loop).
        start_delay_s: pause between the first instrument subscription and the script, so the
            rest of the client's subscribe batches arrive first.
        start_when: instead, start the script once this holds for the connection's log
            (checked after each subscribe), e.g. ``lambda c: len(c.subscribed) == 44``.
        max_channels: longer subscribe lists are refused with -32600.
        refusal_with_id: put the request id in that refusal (the real server leaves it out).
        drop_after_frames, stall_after_frames, garbage_frames, rate_limit_after_requests,
        test_request_every_s, close_unanswered: fault knobs (module docstring).
        faulty_connections: the knobs apply to this many first connections (None: all).
        host, port: where to listen (loopback, port 0 = any free port).
    """

    def __init__(
        self,
        *,
        instruments: Sequence[Mapping[str, Any]] | None = None,
        script: Sequence[ScriptFrame] | None = None,
        loops: int | None = 1,
        interval_s: float = 0.0,
        start_delay_s: float = 0.02,
        start_when: Callable[[ConnectionLog], bool] | None = None,
        max_channels: int = DEFAULT_MAX_CHANNELS,
        refusal_with_id: bool = False,
        drop_after_frames: int | None = None,
        stall_after_frames: int | None = None,
        garbage_frames: Sequence[str | bytes] = (),
        rate_limit_after_requests: int | None = None,
        test_request_every_s: float | None = None,
        close_unanswered: bool = False,
        faulty_connections: int | None = 1,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if max_channels < 1:
            raise InputError("max_channels", f"must be >= 1, got {max_channels}")
        data_dir = default_data_dir()
        if instruments is None:
            capture = data_dir / CAPTURE_INSTRUMENTS if data_dir else None
            if capture is not None and capture.exists():
                instruments = instruments_from_capture(capture)
            else:
                instruments = synthetic_instruments()
        self.instruments: dict[str, dict[str, Any]] = {
            str(i["instrument_name"]): dict(i) for i in instruments
        }
        if script is None:
            capture = data_dir / CAPTURE_WS if data_dir else None
            if capture is not None and capture.exists():
                script = script_from_capture(capture)
            else:
                script = synthetic_script(list(self.instruments.values()))
        self.script: list[ScriptFrame] = list(script)
        self.loops = loops
        self.interval_s = interval_s
        self.start_delay_s = start_delay_s
        self.start_when = start_when
        self.max_channels = max_channels
        self.refusal_with_id = refusal_with_id
        self.drop_after_frames = drop_after_frames
        self.stall_after_frames = stall_after_frames
        self.garbage_frames = list(garbage_frames)
        self.rate_limit_after_requests = rate_limit_after_requests
        self.test_request_every_s = test_request_every_s
        self.close_unanswered = close_unanswered
        self.faulty_connections = faulty_connections
        self.host = host
        self.port = port
        self.connections: list[ConnectionLog] = []
        self._live: set[_Conn] = set()
        self._server: Server | None = None
        self._changed = asyncio.Condition()

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._server = await serve(
            self._handler, self.host, self.port, max_size=None, ping_interval=None
        )

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT/ws/api/v2``."""
        if self._server is None:
            raise InputError("server", "not started")
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://{self.host}:{port}/ws/api/v2"

    # -- test conveniences --------------------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait (at most ``timeout`` s, else TimeoutError) until ``predicate()`` holds; it is
        re-checked whenever a connection's state changes."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def subscribe_counts(self) -> Counter[str]:
        """Subscribe requests per channel over all connections."""
        total: Counter[str] = Counter()
        for c in self.connections:
            total.update(c.subscribe_counts)
        return total

    async def push(self, channel: str, data: Mapping[str, Any]) -> int:
        """Send a notification to every live connection subscribed to ``channel`` (or to a
        channel it prefixes); returns how many got it."""
        n = 0
        for conn in list(self._live):
            target = self._match(conn, channel)
            if target is not None:
                await self._send_notification(conn, target, data)
                n += 1
        return n

    async def push_raw(self, frame: str | bytes) -> int:
        """Send ``frame`` as is to every live connection."""
        for conn in list(self._live):
            await self._send(conn, frame)
        return len(self._live)

    async def send_test_request(self) -> int:
        """A heartbeat ``test_request`` to every live connection."""
        for conn in list(self._live):
            await self._send_test_request(conn)
        return len(self._live)

    async def list_instrument(self, instrument: Mapping[str, Any]) -> int:
        """List a new option and announce it on ``instrument.state.option.{CUR}``."""
        name = str(instrument["instrument_name"])
        self.instruments[name] = dict(instrument)
        data = {"instrument_name": name, "state": "created", "timestamp": _now_ms()}
        return await self.push(f"instrument.state.option.{instrument['base_currency']}", data)

    async def settle_instrument(self, name: str) -> int:
        """De-list an option and announce its settlement."""
        inst = self.instruments.pop(name)
        data = {"instrument_name": name, "state": "settled", "timestamp": _now_ms()}
        return await self.push(f"instrument.state.option.{inst['base_currency']}", data)

    async def drop_all(self) -> None:
        """Abort every live connection (no close frame, like a network failure)."""
        for conn in list(self._live):
            conn.log.closed_by_server = "drop"
            conn.ws.transport.abort()

    # -- the connection handler ---------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        index = len(self.connections)
        faulty = self.faulty_connections is None or index < self.faulty_connections
        conn = _Conn(ws, ConnectionLog(index=index), faulty)
        self.connections.append(conn.log)
        self._live.add(conn)
        await self._notify()
        try:
            async with asyncio.TaskGroup() as tg:
                pump = tg.create_task(self._pump(conn), name=f"fake-deribit pump {index}")
                beat = tg.create_task(self._beat(conn), name=f"fake-deribit beat {index}")
                try:
                    async for message in ws:
                        await self._on_request(conn, message)
                except ConnectionClosed:
                    pass
                finally:
                    pump.cancel()
                    beat.cancel()
        finally:
            conn.log.open = False
            self._live.discard(conn)
            await self._notify()

    async def _on_request(self, conn: _Conn, message: str | bytes) -> None:
        try:
            req = json.loads(message)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError:
            await self._reply(conn, None, error=(INVALID_REQUEST, "Invalid Request"))
            return
        conn.log.requests.append(req)
        rid = req.get("id")
        method = str(req.get("method", ""))
        params = req.get("params") or {}
        limit = self.rate_limit_after_requests
        if conn.faulty and limit is not None and len(conn.log.requests) > limit:
            conn.log.rate_limited_requests += 1
            await self._reply(conn, rid, error=(TOO_MANY_REQUESTS, "too_many_requests"))
            return
        if method == "public/test":
            if conn.unanswered > 0:
                conn.unanswered -= 1
                conn.log.test_requests_answered += 1
            await self._reply(conn, rid, result={"version": "1.2.26"})
        elif method == "public/set_heartbeat":
            conn.log.heartbeat_interval = float(params.get("interval", 0))
            if conn.log.heartbeat_interval < 10:
                await self._reply(conn, rid, error=(INVALID_PARAMS, "Invalid params"))
            else:
                await self._reply(conn, rid, result="ok")
        elif method == "public/get_instruments":
            await self._reply(conn, rid, result=self._listing(params))
        elif method in ("public/subscribe", "public/unsubscribe"):
            await self._on_subscribe(conn, rid, method, params)
        else:
            await self._reply(conn, rid, error=(METHOD_NOT_FOUND, "Method not found"))
        await self._notify()

    def _listing(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        cur = str(params.get("currency", "any")).upper()
        kind = params.get("kind")
        expired = bool(params.get("expired", False))
        out = []
        for inst in self.instruments.values():
            currencies = {inst.get("base_currency"), inst.get("settlement_currency")}
            if cur != "ANY" and cur not in currencies:
                continue
            if kind is not None and inst.get("kind") != kind:
                continue
            if expired:  # the fake keeps no expired instruments
                continue
            out.append(inst)
        return out

    async def _on_subscribe(
        self, conn: _Conn, rid: object, method: str, params: Mapping[str, Any]
    ) -> None:
        channels = params.get("channels")
        if not isinstance(channels, list):
            await self._reply(conn, rid, error=(INVALID_PARAMS, "Invalid params"))
            return
        if len(channels) > self.max_channels:
            conn.log.refused_requests += 1
            await self._reply(
                conn,
                rid if self.refusal_with_id else None,
                error=(INVALID_REQUEST, "request entity too large"),
            )
            return
        accepted = [str(ch) for ch in channels if self._valid(str(ch))]
        snapshots: list[tuple[str, dict[str, Any]]] = []
        if method == "public/subscribe":
            conn.log.subscribe_counts.update(str(ch) for ch in channels)
            for ch in accepted:
                conn.log.subscribed.add(ch)
                parts = ch.split(".")
                if parts[0] in _INSTRUMENT_KINDS:
                    prefix = f"{parts[0]}.{parts[1]}"
                    conn.by_prefix[prefix] = ch
                    if self.start_when is None:
                        conn.ready.set()
                    if ch in conn.ever_subscribed and prefix in conn.snapshots:
                        snap = dict(conn.snapshots[prefix])
                        snap.update(type="snapshot", timestamp=_now_ms())
                        snap["change_id"] = conn.change_ids.get(prefix, snap.get("change_id"))
                        snapshots.append((ch, snap))
                conn.ever_subscribed.add(ch)
        else:
            conn.log.unsubscribe_counts.update(str(ch) for ch in channels)
            accepted = [str(ch) for ch in channels if ch in conn.log.subscribed]
            for ch in accepted:
                conn.log.subscribed.discard(ch)
                parts = ch.split(".")
                if len(parts) >= 2:
                    conn.by_prefix.pop(f"{parts[0]}.{parts[1]}", None)
        if self.start_when is not None and self.start_when(conn.log):
            conn.ready.set()
        await self._reply(conn, rid, result=accepted)
        for ch, snap in snapshots:  # a book re-subscription starts with a fresh snapshot
            await self._send_notification(conn, ch, snap)

    def _valid(self, channel: str) -> bool:
        """Instrument channels only for listed instruments; other channels are taken."""
        parts = channel.split(".")
        if parts[0] in _INSTRUMENT_KINDS:
            return len(parts) >= 3 and parts[1] in self.instruments
        return len(parts) >= 2

    def _match(self, conn: _Conn, channel: str) -> str | None:
        if channel in conn.log.subscribed:
            return channel
        return conn.by_prefix.get(channel)

    # -- sending ------------------------------------------------------------------------------

    async def _pump(self, conn: _Conn) -> None:
        await conn.ready.wait()
        if self.start_when is None:
            await asyncio.sleep(self.start_delay_s)
        if conn.faulty:
            for frame in self.garbage_frames:
                await self._send(conn, frame)
        loop = 0
        while self.loops is None or loop < self.loops:
            loop += 1
            for item in self.script:
                target = self._match(conn, item.channel)
                if target is None:
                    continue
                if self._reached(conn, self.stall_after_frames):
                    conn.log.stalled = True
                    await self._notify()
                    return
                await self._send_notification(conn, target, item.data)
                conn.log.script_frames += 1
                if self._reached(conn, self.drop_after_frames):
                    conn.log.closed_by_server = "drop"
                    conn.ws.transport.abort()
                    return
                await asyncio.sleep(self.interval_s)
            if not self.script:
                return

    @staticmethod
    def _reached(conn: _Conn, limit: int | None) -> bool:
        """A faulty connection has sent ``limit`` script frames."""
        return conn.faulty and limit is not None and conn.log.script_frames >= limit

    async def _beat(self, conn: _Conn) -> None:
        every = self.test_request_every_s
        if every is None:
            return
        while True:
            await asyncio.sleep(every)
            if self.close_unanswered and conn.unanswered > 0:
                conn.log.closed_by_server = "unanswered test_request"
                await conn.ws.close(1000, "test_request not answered")
                return
            await self._send_test_request(conn)

    async def _send_test_request(self, conn: _Conn) -> None:
        conn.unanswered += 1
        conn.log.test_requests_sent += 1
        await self._send(conn, TEST_REQUEST)

    async def _send_notification(self, conn: _Conn, channel: str, data: Mapping[str, Any]) -> None:
        frame = notification(channel, data)
        if await self._send(conn, frame):
            conn.log.notifications.append(frame)
            if channel.startswith("book."):
                prefix = ".".join(channel.split(".")[:2])
                if data.get("type") == "snapshot":
                    conn.snapshots[prefix] = data
                if "change_id" in data:
                    conn.change_ids[prefix] = data["change_id"]

    async def _reply(
        self,
        conn: _Conn,
        rid: object,
        *,
        result: object = None,
        error: tuple[int, str] | None = None,
    ) -> None:
        us_in = time.time_ns() // 1000
        msg: dict[str, Any] = {"jsonrpc": "2.0"}
        if rid is not None:
            msg["id"] = rid
        if error is not None:
            msg["error"] = {"code": error[0], "message": error[1]}
        else:
            msg["result"] = result
        us_out = time.time_ns() // 1000
        msg.update(usIn=us_in, usOut=us_out, usDiff=us_out - us_in, testnet=False)
        await self._send(conn, json.dumps(msg, separators=(",", ":")))

    async def _send(self, conn: _Conn, frame: str | bytes) -> bool:
        """Send unless the connection is stalled or gone; True if sent."""
        if conn.log.stalled or not conn.log.open:
            return False
        try:
            await conn.ws.send(frame)
        except ConnectionClosed:
            return False
        conn.log.sent.append(frame if isinstance(frame, str) else frame.decode("latin-1"))
        await self._notify()
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


__all__ = [
    "ConnectionLog",
    "FakeDeribitServer",
    "ScriptFrame",
    "instruments_from_capture",
    "notification",
    "script_from_capture",
    "synthetic_instruments",
    "synthetic_script",
    "synthetic_ticker",
]
