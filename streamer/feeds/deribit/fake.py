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

Bad-data knobs (faulty connections only; choices drawn from ``fault_seed``, every injected
fault counted by kind in ``ConnectionLog.faults``): ``live_timestamps`` (every script frame is
stamped with the send time, as the exchange stamps its notifications, every other pass moves
ticker prices by ``LIVE_WIGGLE`` so a looped market keeps changing, and book ``change_id``s
are renumbered per connection so looping never gaps by itself), ``malformed_ratio`` (that share
of script frames is replaced by a malformed one, one of ``MALFORMED``: the parser's drop reason
for each is its key), ``duplicate_ratio`` (sent twice), ``timestamp_faults`` (kind -> share of
ticker frames: ``us`` timestamp x 1000, ``s`` / 1000, ``skew`` one day ahead),
``book_gap_ratio`` (a book change with a wrong ``prev_change_id``), ``book_reorder_ratio`` (a
book change held back and sent after the next one of the same book: out of order),
``subscribe_refusals`` (the first N subscribe requests get -32600 "request entity too large",
without an id), ``test_request_storm`` (that many ``test_request`` at once when the script
starts, and again every ``test_request_storm_every_s`` if set). ``oversized_frames`` are sent
(as is) before the script, like ``garbage_frames``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from streamer.errors import InputError
from streamer.events import Event, Instrument, InstrumentListed, Quote
from streamer.feeds.recordings.reader import read_frames
from streamer.feeds.recordings.tardis import read_tardis_options_chain, sorted_by_time
from streamer.instruments import parse_option
from streamer.lifecycle import AsyncResource
from streamer.paths import deribit_data

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
    """The real Deribit data (``streamer.paths.deribit_data``), or None where it is absent."""
    path = deribit_data()
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


MALFORMED = ("bad_json", "bad_type", "missing_field", "not_object", "unknown_channel")
"""The malformed frames ``malformed_ratio`` injects, named by the parser's drop reason."""
TIMESTAMP_FAULTS = ("us", "s", "skew")
SKEW_MS = 86_400_000  # the "skew" timestamp fault: a day ahead
LIVE_WIGGLE = 1e-4  # live_timestamps: every other pass moves ticker prices by this much


def malformed_frame(kind: str, channel: str, data: Mapping[str, Any]) -> str:
    """A broken version of the notification ``channel``/``data``: ``kind`` in ``MALFORMED``."""
    if kind == "bad_json":
        text = notification(channel, data)
        return text[: len(text) // 2]  # cut in the middle
    if kind == "bad_type":
        return notification(channel, {**data, "best_bid_price": "n/a", "timestamp": "soon"})
    if kind == "missing_field":
        return notification(channel, {k: v for k, v in data.items() if k != "instrument_name"})
    if kind == "not_object":
        return json.dumps([channel, 1, 2])
    if kind == "unknown_channel":
        return notification("nonsense." + channel, data)
    raise InputError("kind", f"one of {', '.join(MALFORMED)}, got {kind!r}")


def synthetic_book_script(
    instruments: Sequence[Mapping[str, Any]], rounds: int = 3, ts0_ms: int = 1_700_000_000_000
) -> list[ScriptFrame]:
    """A ``book`` snapshot per instrument, then ``rounds - 1`` changes each (change_ids 1,
    2, ...; prices in coin around the synthetic tickers')."""
    out: list[ScriptFrame] = []
    for k in range(rounds):
        for inst in instruments:
            name = inst["instrument_name"]
            bid = round(0.05 + 0.0005 * k, 4)
            data: dict[str, Any] = {
                "timestamp": ts0_ms + 100 * k,
                "instrument_name": name,
                "change_id": k + 1,
            }
            if k == 0:
                data.update(
                    type="snapshot",
                    bids=[["new", bid, 10.0], ["new", bid - 0.0005, 5.0]],
                    asks=[["new", bid + 0.001, 12.0], ["new", bid + 0.0015, 3.0]],
                )
            else:
                prev = round(0.05 + 0.0005 * (k - 1), 4)
                data.update(
                    type="change",
                    prev_change_id=k,
                    bids=[["delete", prev, 0.0], ["new", bid, 10.0]],
                    asks=[["delete", prev + 0.001, 0.0], ["new", bid + 0.001, 12.0]],
                )
            out.append(ScriptFrame(f"book.{name}", data))
    return out


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
    script_done: bool = False  # the script's loops all went out
    faults: Counter[str] = field(default_factory=Counter)  # injected bad data, by kind
    doubled: Counter[str] = field(default_factory=Counter)  # subscribed while subscribed

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
        self.next_change_id: dict[str, int] = {}  # live_timestamps: "book.X" -> last id used
        self.held: dict[str, tuple[str, dict[str, Any]]] = {}  # book changes sent late
        self.subscribe_requests = 0
        self.passes = 0  # script passes started on this connection


class FakeDeribitServer(AsyncResource):
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
        live_timestamps, malformed_ratio, duplicate_ratio, timestamp_faults, book_gap_ratio,
        book_reorder_ratio, subscribe_refusals, test_request_storm,
        test_request_storm_every_s, oversized_frames, fault_seed: bad-data knobs (module
        docstring).
        faulty_connections: the knobs apply to this many first connections (None: all);
        ``live_timestamps`` applies to every connection.
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
        live_timestamps: bool = False,
        malformed_ratio: float = 0.0,
        duplicate_ratio: float = 0.0,
        timestamp_faults: Mapping[str, float] | None = None,
        book_gap_ratio: float = 0.0,
        book_reorder_ratio: float = 0.0,
        subscribe_refusals: int = 0,
        test_request_storm: int = 0,
        test_request_storm_every_s: float | None = None,
        oversized_frames: Sequence[str | bytes] = (),
        fault_seed: int = 0,
        faulty_connections: int | None = 1,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if max_channels < 1:
            raise InputError("max_channels", f"must be >= 1, got {max_channels}")
        faults = dict(timestamp_faults or {})
        for kind in faults:
            if kind not in TIMESTAMP_FAULTS:
                raise InputError("timestamp_faults", f"kinds are {TIMESTAMP_FAULTS}, got {kind!r}")
        shares = {
            "malformed_ratio": malformed_ratio,
            "duplicate_ratio": duplicate_ratio,
            "book_gap_ratio": book_gap_ratio,
            "book_reorder_ratio": book_reorder_ratio,
            **{f"timestamp_faults.{k}": v for k, v in faults.items()},
        }
        for key, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise InputError(key, f"must lie in [0, 1], got {share}")
        if sum(faults.values()) + malformed_ratio > 1.0:
            raise InputError("malformed_ratio", "with the timestamp faults, at most 1 in all")
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
        self.live_timestamps = live_timestamps
        self.malformed_ratio = malformed_ratio
        self.duplicate_ratio = duplicate_ratio
        self.timestamp_faults = faults
        self.book_gap_ratio = book_gap_ratio
        self.book_reorder_ratio = book_reorder_ratio
        self.subscribe_refusals = subscribe_refusals
        self.test_request_storm = test_request_storm
        self.test_request_storm_every_s = test_request_storm_every_s
        self.oversized_frames = list(oversized_frames)
        self.rng = random.Random(fault_seed)
        self.faulty_connections = faulty_connections
        self.host = host
        self.port = port
        self.connections: list[ConnectionLog] = []
        self._live: set[_Conn] = set()
        self._server: Server | None = None
        self._changed = asyncio.Condition()

    # -- lifecycle ----------------------------------------------------------------------------

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

    def faults(self) -> Counter[str]:
        """Injected bad data by kind over all connections (``ConnectionLog.faults``)."""
        total: Counter[str] = Counter()
        for c in self.connections:
            total.update(c.faults)
        return total

    async def send_test_requests(self, n: int) -> int:
        """A storm: ``n`` heartbeat ``test_request`` at once to every live connection."""
        for conn in list(self._live):
            for _ in range(n):
                await self._send_test_request(conn)
        return len(self._live)

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
                storm = tg.create_task(self._storm(conn), name=f"fake-deribit storm {index}")
                try:
                    async for message in ws:
                        await self._on_request(conn, message)
                except ConnectionClosed:
                    pass
                finally:
                    pump.cancel()
                    beat.cancel()
                    storm.cancel()
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
            if method == "public/subscribe":
                conn.subscribe_requests += 1
                if conn.faulty and conn.subscribe_requests <= self.subscribe_refusals:
                    conn.log.refused_requests += 1
                    conn.log.faults["subscribe_refused"] += 1
                    await self._reply(
                        conn, None, error=(INVALID_REQUEST, "request entity too large")
                    )
                    await self._notify()
                    return
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
                if ch in conn.log.subscribed:
                    conn.log.doubled[ch] += 1
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
                        snap["change_id"] = conn.next_change_id.get(prefix) or conn.change_ids.get(
                            prefix, snap.get("change_id")
                        )  # live: the newest id handed out (a late change is older)
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
            for frame in self.oversized_frames:
                if await self._send(conn, frame):
                    conn.log.faults["too_large"] += 1
        loop = 0
        while self.loops is None or loop < self.loops:
            loop += 1
            conn.passes = loop
            for item in self.script:
                target = self._match(conn, item.channel)
                if target is None:
                    continue
                if self._reached(conn, self.stall_after_frames):
                    conn.log.stalled = True
                    await self._notify()
                    return
                await self._send_script_frame(conn, target, item)
                conn.log.script_frames += 1
                if self._reached(conn, self.drop_after_frames):
                    conn.log.closed_by_server = "drop"
                    conn.ws.transport.abort()
                    return
                await asyncio.sleep(self.interval_s)
            if not self.script:
                break
        conn.log.script_done = True
        await self._notify()

    async def _send_script_frame(self, conn: _Conn, channel: str, item: ScriptFrame) -> None:
        """One script notification, live-stamped and with this connection's faults."""
        data = dict(item.data)
        kind = channel.split(".", 1)[0]
        if self.live_timestamps:
            data["timestamp"] = _now_ms()
            if kind == "book":
                self._renumber(conn, channel, data)
            elif kind == "ticker" and conn.passes % 2 == 0:  # the market moves a little
                for key in ("best_bid_price", "best_ask_price", "mark_price"):
                    px = data.get(key)
                    if isinstance(px, float) and px > 0:
                        data[key] = px * (1.0 + LIVE_WIGGLE)
        rng = self.rng
        if conn.faulty and kind == "book" and data.get("type") == "change":
            if self.book_gap_ratio and rng.random() < self.book_gap_ratio:
                data["prev_change_id"] = int(data.get("prev_change_id", 0)) - 1
                conn.log.faults["book_gap"] += 1
            elif self.book_reorder_ratio and rng.random() < self.book_reorder_ratio:
                prefix = ".".join(channel.split(".")[:2])
                if prefix not in conn.held:
                    conn.held[prefix] = (channel, data)  # sent after the next change
                    conn.log.faults["book_reorder"] += 1
                    return
        if conn.faulty and kind == "ticker":
            u = rng.random()
            for fault, share in self.timestamp_faults.items():
                if u < share:
                    ts = int(data["timestamp"])
                    data["timestamp"] = {
                        "us": ts * 1000,
                        "s": ts // 1000,
                        "skew": ts + SKEW_MS,
                    }[fault]
                    conn.log.faults[f"timestamp_{fault}"] += 1
                    break
                u -= share
            else:
                if u < self.malformed_ratio:
                    bad = MALFORMED[rng.randrange(len(MALFORMED))]
                    if await self._send(conn, malformed_frame(bad, channel, data)):
                        conn.log.faults[bad] += 1
                    return
        await self._send_notification(conn, channel, data)
        prefix = ".".join(channel.split(".")[:2])
        held = conn.held.pop(prefix, None) if kind == "book" else None
        if held is not None:
            await self._send_notification(conn, *held)
        if conn.faulty and self.duplicate_ratio and rng.random() < self.duplicate_ratio:
            await self._send_notification(conn, channel, data)
            conn.log.faults["duplicate"] += 1

    @staticmethod
    def _renumber(conn: _Conn, channel: str, data: dict[str, Any]) -> None:
        """Book change_ids continue per connection (a looped script does not gap)."""
        prefix = ".".join(channel.split(".")[:2])
        seen = conn.next_change_id.get(prefix)
        last = seen or 0
        if data.get("type") != "snapshot":
            if seen is None:  # no snapshot sent on this connection yet: start with one
                data["type"] = "snapshot"
                data.pop("prev_change_id", None)
            else:
                data["prev_change_id"] = last
        data["change_id"] = last + 1
        conn.next_change_id[prefix] = last + 1

    async def _storm(self, conn: _Conn) -> None:
        """``test_request_storm`` at once when the script starts, and again every
        ``test_request_storm_every_s`` when set (a task of the connection's handler)."""
        if not (conn.faulty and self.test_request_storm):
            return
        await conn.ready.wait()
        while conn.log.open and not conn.log.stalled:
            for _ in range(self.test_request_storm):
                conn.unanswered += 1  # before sending: the answer may come at once
                conn.log.test_requests_sent += 1
                if await self._send(conn, TEST_REQUEST):
                    conn.log.faults["test_request"] += 1
                else:
                    conn.unanswered -= 1
                    conn.log.test_requests_sent -= 1
            await self._notify()
            if self.test_request_storm_every_s is None:
                return
            await asyncio.sleep(self.test_request_storm_every_s)

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


# -- serving recordings (``streamer fake-deribit``) ----------------------------------------------

LISTED_STATES = frozenset({"created", "started"})
GONE_STATES = frozenset({"settled", "deactivated", "closed", "terminated"})
LOOP_GAP_NS = 1_000_000_000  # between the last frame of a pass and the first of the next
PRICE_TICK = 0.0001


@dataclass(frozen=True, slots=True)
class RecordedItem:
    """One thing a recording says, in time order: a notification (``channel``, ``data``) or,
    for a ``get_instruments`` reply, the instruments it ``listed``."""

    ts_ns: int
    channel: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    listed: tuple[Mapping[str, Any], ...] = ()


def instrument_from_name(name: str, created_ms: int = 0) -> dict[str, Any] | None:
    """A ``get_instruments`` entry for a Deribit option name (metadata from the name, Deribit's
    usual tick and contract sizes); None for what is not a single option."""
    opt = parse_option(name)
    if opt is None:
        return None
    base, _, settle = opt.underlying.partition("_")
    return {
        "instrument_name": name,
        "kind": "option",
        "base_currency": base,
        "quote_currency": settle or base,
        "settlement_currency": settle or base,
        "counter_currency": settle or "USD",
        "option_type": "call" if opt.is_call else "put",
        "strike": opt.strike,
        "expiration_timestamp": opt.expiry_ms,
        "creation_timestamp": created_ms,
        "tick_size": PRICE_TICK,
        "contract_size": 1.0,
        "min_trade_amount": 0.1,
        "is_active": True,
        "settlement_period": "day",
    }


def _instrument_dict(inst: Instrument) -> dict[str, Any]:
    """A ``get_instruments`` entry for a normalized ``Instrument`` (Tardis rows)."""
    out = instrument_from_name(inst.name) or {}
    base, _, settle = inst.underlying.partition("_")
    out.update(
        instrument_name=inst.name,
        kind="option",
        base_currency=base,
        quote_currency=settle or base,
        settlement_currency=settle or base,
        option_type="call" if inst.is_call else "put",
        strike=inst.strike,
        expiration_timestamp=inst.expiry_ms,
        contract_size=inst.contract_size,
    )
    out.setdefault("tick_size", PRICE_TICK)
    out.setdefault("is_active", True)
    return out


def _black_coin(forward: float, strike: float, T: float, iv: float, is_call: bool) -> float:
    """Black-76 premium in coin (USD / F, r = 0; DESIGN section 2): for Tardis cuts that carry
    IVs without prices. NaN where it cannot be priced."""
    if not (forward > 0 and strike > 0 and T > 0 and iv > 0):
        return math.nan
    s = iv * math.sqrt(T)
    d1 = (math.log(forward / strike) + 0.5 * s * s) / s
    cdf1 = 0.5 * math.erfc(-d1 / math.sqrt(2.0))
    cdf2 = 0.5 * math.erfc(-(d1 - s) / math.sqrt(2.0))
    call = forward * cdf1 - strike * cdf2
    usd = call if is_call else call - (forward - strike)
    return max(usd, 0.0) / forward


def _percent(x: float) -> float:
    """A fraction as Deribit's percent IV; 0 (Deribit's "none") for NaN."""
    return round(100.0 * x, 4) if x == x else 0.0  # noqa: PLR0124 - NaN test


def ticker_from_quote(quote: Quote, inst: Instrument) -> dict[str, Any]:
    """A ``ticker`` notification's data for a normalized quote (Tardis rows). A side with an
    IV but no price (the hourly cuts keep no prices) is priced from its IV (Black-76)."""
    T = (inst.expiry_ms - quote.ts_ms) / (365 * 86_400_000)

    def side(price: float, iv: float, size: float) -> tuple[float, float]:
        if not price > 0 and iv > 0:
            price = _black_coin(quote.forward, inst.strike, T, iv, inst.is_call)
            price = round(price, 8) if price > 0 else math.nan
            size = size if size > 0 else 1.0
        if not price > 0:
            return 0.0, 0.0
        return price, size if size == size else 0.0  # noqa: PLR0124

    bid, bid_size = side(quote.bid, quote.bid_iv, quote.bid_size)
    ask, ask_size = side(quote.ask, quote.ask_iv, quote.ask_size)

    def num(x: float) -> float | None:
        return x if x == x else None  # noqa: PLR0124

    return {
        "timestamp": quote.ts_ms,
        "instrument_name": quote.instrument,
        "state": "open",
        "best_bid_price": bid,
        "best_bid_amount": bid_size,
        "best_ask_price": ask,
        "best_ask_amount": ask_size,
        "bid_iv": _percent(quote.bid_iv) if bid else 0.0,
        "ask_iv": _percent(quote.ask_iv) if ask else 0.0,
        "mark_iv": _percent(quote.mark_iv),
        "mark_price": num(quote.mark_price),
        "underlying_price": num(quote.forward),
        "underlying_index": quote.forward_index or f"{inst.underlying}-{inst.expiry}",
        "index_price": num(quote.index_price),
        "open_interest": num(quote.open_interest),
        "interest_rate": 0.0,
        "greeks": {
            "delta": num(quote.delta),
            "gamma": num(quote.gamma),
            "vega": num(quote.vega),
            "theta": num(quote.theta),
            "rho": num(quote.rho),
        },
    }


def _is_tardis(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).lower().endswith((".csv", ".csv.gz"))


def _tardis_items(path: str | os.PathLike[str], in_order: bool) -> Iterator[RecordedItem]:
    """A Tardis ``options_chain`` CSV as ticker notifications (time order: files out of order,
    the hourly cuts, are sorted in memory)."""
    events: Iterable[tuple[int, Event]] = read_tardis_options_chain(path)
    if not in_order:
        events = sorted_by_time(events)
    listed: dict[str, Instrument] = {}
    for ts_ns, ev in events:
        if isinstance(ev, InstrumentListed):
            listed[ev.instrument.name] = ev.instrument
        elif isinstance(ev, Quote) and ev.instrument in listed:
            data = ticker_from_quote(ev, listed[ev.instrument])
            yield RecordedItem(ts_ns, f"ticker.{ev.instrument}.100ms", data)


def _recording_items(path: str | os.PathLike[str]) -> Iterator[RecordedItem]:
    """A recording's (or cryptofeed capture's) notifications and ``get_instruments`` replies;
    everything else (other replies, heartbeats, undecodable frames) is skipped."""
    for ts_ns, _venue, frame in read_frames(path):
        try:
            msg = orjson.loads(frame)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(msg, dict):
            continue
        if msg.get("method") == "subscription":
            params = msg.get("params")
            if isinstance(params, dict) and isinstance(params.get("data"), dict):
                yield RecordedItem(ts_ns, str(params.get("channel", "")), params["data"])
        elif isinstance(msg.get("result"), list):
            rows = [r for r in msg["result"] if isinstance(r, dict) and "instrument_name" in r]
            if rows:
                yield RecordedItem(ts_ns, listed=tuple(rows))


@dataclass
class RecordingIndex:
    """What one pass over the recordings found (``RecordingIndex.scan``): the instruments live
    at the start (``get_instruments`` replies, plus every instrument quoted but never announced
    by ``instrument.state``), the first and last receive times, the notification count, and for
    each Tardis file whether it is in time order."""

    paths: tuple[str, ...]
    initial: dict[str, dict[str, Any]]
    first_ns: int
    last_ns: int
    notifications: int
    in_order: dict[str, bool]

    @classmethod
    def scan(cls, paths: Sequence[str | os.PathLike[str]]) -> RecordingIndex:
        """Read every file once. Raises ``InputError`` if a file is missing or carries no
        notification at all."""
        names = tuple(os.fspath(p) for p in paths)
        for name in names:
            if not os.path.isfile(name):
                raise InputError("file", f"{name}: no such file")
        in_order: dict[str, bool] = {}
        replies: dict[str, dict[str, Any]] = {}
        quoted: dict[str, int] = {}  # instrument -> first ts_ms seen
        announced: set[str] = set()
        first, last, count = -1, -1, 0
        for name in names:
            if _is_tardis(name):
                prev, ordered = -1, True
                for ts_ns, ev in read_tardis_options_chain(name):
                    ordered = ordered and ts_ns >= prev
                    prev = max(prev, ts_ns)
                    if isinstance(ev, InstrumentListed):
                        replies.setdefault(ev.instrument.name, _instrument_dict(ev.instrument))
                    else:
                        count += 1
                        first = ts_ns if first < 0 else min(first, ts_ns)
                        last = max(last, ts_ns)
                in_order[name] = ordered
                continue
            for item in _recording_items(name):
                first = item.ts_ns if first < 0 else first
                last = max(last, item.ts_ns)
                if item.listed:
                    for row in item.listed:
                        replies.setdefault(str(row["instrument_name"]), dict(row))
                    continue
                count += 1
                kind = item.channel.split(".", 1)[0]
                inst = item.data.get("instrument_name")
                if not isinstance(inst, str):
                    continue
                if kind == "instrument":
                    announced.add(inst)
                elif kind in _INSTRUMENT_KINDS:
                    ts = item.data.get("timestamp")
                    quoted.setdefault(inst, int(ts) if isinstance(ts, int | float) else 0)
        if count == 0:
            raise InputError("file", f"no Deribit notifications in {', '.join(names)}")
        initial = dict(replies)
        for inst, ts_ms in quoted.items():
            if inst not in initial and inst not in announced:
                entry = instrument_from_name(inst, ts_ms)
                if entry is not None:
                    initial[inst] = entry
        return cls(names, initial, first, last, count, in_order)

    def items(self) -> Iterator[RecordedItem]:
        """Every notification and listing of the files, in order (one more pass)."""
        for name in self.paths:
            if _is_tardis(name):
                yield from _tardis_items(name, self.in_order.get(name, True))
            else:
                yield from _recording_items(name)


def _shifted(data: Mapping[str, Any], shift_ms: int) -> Mapping[str, Any]:
    """``data`` with its ``timestamp`` moved by ``shift_ms`` (a looped pass)."""
    ts = data.get("timestamp")
    if not shift_ms or not isinstance(ts, int | float):
        return data
    out = dict(data)
    out["timestamp"] = int(ts) + shift_ms
    return out


@dataclass
class _BookState:
    """One recorded order book, kept so a client subscribing mid-stream starts from a
    snapshot (as Deribit sends one on every book subscription)."""

    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)
    last: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, data: Mapping[str, Any]) -> None:
        if data.get("type") == "snapshot":
            self.bids.clear()
            self.asks.clear()
        for side, levels in ((self.bids, data.get("bids")), (self.asks, data.get("asks"))):
            for level in levels if isinstance(levels, list) else ():
                if not isinstance(level, list) or len(level) < 2:
                    continue
                action, price, amount = (level if len(level) == 3 else ["new", *level])[:3]
                if action == "delete" or not amount:
                    side.pop(float(price), None)
                else:
                    side[float(price)] = float(amount)
        self.last = data

    def snapshot(self) -> dict[str, Any]:
        snap = {k: v for k, v in self.last.items() if k not in ("prev_change_id", "bids", "asks")}
        snap["type"] = "snapshot"
        snap["bids"] = [["new", p, a] for p, a in sorted(self.bids.items(), reverse=True)]
        snap["asks"] = [["new", p, a] for p, a in sorted(self.asks.items())]
        return snap


class RecordingServer(FakeDeribitServer):
    """Recordings served as a live Deribit websocket on loopback (``streamer fake-deribit``).

    One market for every connection, as on the real exchange: the recordings' notifications
    (``RecordingIndex``: our recordings, cryptofeed captures, Tardis ``options_chain`` CSVs as
    tickers) are sent at their recorded pace times ``speed``, from the first instrument
    subscription on, each to the connections subscribed to its channel (any interval:
    ``ticker.X.100ms`` recorded reaches ``ticker.X.raw`` too). ``public/get_instruments``
    answers the instruments live at the market's current time: the recording's own
    ``get_instruments`` replies (and any instrument it quotes without announcing it), plus
    ``instrument.state`` listings replayed so far, minus settled ones and those past their
    expiry. A new ticker subscription gets the instrument's latest ticker at once and a book
    subscription a snapshot of the book so far, as Deribit sends them. After
    ``public/set_heartbeat`` a heartbeat ``test_request`` goes out every interval and a
    connection that left the previous one unanswered is closed, as Deribit does. ``loop``:
    when the recordings end they start again with every ``timestamp`` moved on by the
    recording's length (plus ``LOOP_GAP_NS``), so time keeps running forward; otherwise
    ``finished`` is set and the connections are closed (the exchange went away).
    Memory stays bounded: no per-frame logs are kept (unlike the test server's).
    """

    def __init__(
        self,
        index: RecordingIndex,
        *,
        speed: float = 1.0,
        loop: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not speed > 0:
            raise InputError("speed", f"must be positive, got {speed}")
        super().__init__(instruments=list(index.initial.values()), script=[], host=host, port=port)
        self.index = index
        self.speed = speed
        self.loop = loop
        self.passes = 0  # passes started
        self.frames_sent = 0  # notifications delivered (all connections)
        self.market_ms = 0  # the market's clock: the newest timestamp replayed (shifted)
        self.finished = asyncio.Event()
        self._started = asyncio.Event()  # the first instrument subscription
        self._latest: dict[str, tuple[str, Mapping[str, Any]]] = {}  # "ticker.X" -> last
        self._books: dict[str, _BookState] = {}
        self._market_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._market_task = asyncio.create_task(self._market(), name="fake-deribit market")

    async def aclose(self) -> None:
        task, self._market_task = self._market_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().aclose()

    # -- the market ---------------------------------------------------------------------------

    async def _market(self) -> None:
        await self._started.wait()
        span_ns = max(self.index.last_ns - self.index.first_ns, 0) + LOOP_GAP_NS
        start = time.monotonic_ns()
        while True:
            shift_ns = self.passes * span_ns
            self.passes += 1
            sent_since_yield = 0
            for item in self.index.items():
                due = start + (item.ts_ns + shift_ns - self.index.first_ns) / self.speed
                delay = due - time.monotonic_ns()
                if delay > 0:
                    await asyncio.sleep(delay / 1e9)
                    sent_since_yield = 0
                elif sent_since_yield >= 200:  # running behind: let replies through
                    await asyncio.sleep(0)
                    sent_since_yield = 0
                sent_since_yield += 1
                await self._replay(item, shift_ns // 1_000_000)
            if not self.loop:
                break
            log.info("fake_deribit_loop", passes=self.passes, frames_sent=self.frames_sent)
        self.finished.set()
        log.info("fake_deribit_finished", passes=self.passes, frames_sent=self.frames_sent)
        for conn in list(self._live):
            with contextlib.suppress(ConnectionClosed):
                await conn.ws.close(1001, "recording finished")

    async def _replay(self, item: RecordedItem, shift_ms: int) -> None:
        if item.listed:  # a get_instruments reply in the recording: the listing as of now
            for row in item.listed:
                self.instruments.setdefault(str(row["instrument_name"]), dict(row))
            return
        data = _shifted(item.data, shift_ms)
        ts = data.get("timestamp")
        if isinstance(ts, int | float) and ts > self.market_ms:
            self.market_ms = int(ts)
            self._expire(self.market_ms)
        parts = item.channel.split(".")
        prefix = ".".join(parts[:2])
        kind = parts[0]
        name = data.get("instrument_name")
        if kind == "instrument" and isinstance(name, str):
            state = data.get("state")
            if state in LISTED_STATES and name not in self.instruments:
                entry = instrument_from_name(name, int(ts) if isinstance(ts, int | float) else 0)
                if entry is not None:
                    self.instruments[name] = entry
            elif state in GONE_STATES:
                self.instruments.pop(name, None)
        elif kind in _INSTRUMENT_KINDS:
            self._latest[prefix] = (item.channel, data)
            if kind == "book":
                self._books.setdefault(prefix, _BookState()).apply(data)
        for conn in list(self._live):
            target = self._match(conn, item.channel) or self._match(conn, prefix)
            if target is not None:
                await self._send_notification(conn, target, data)

    def _expire(self, now_ms: int) -> None:
        gone = [
            name
            for name, row in self.instruments.items()
            if int(row.get("expiration_timestamp", now_ms + 1)) <= now_ms
        ]
        for name in gone:
            del self.instruments[name]

    # -- protocol: what the test server does, plus the exchange's own habits -------------------

    async def _on_request(self, conn: _Conn, message: str | bytes) -> None:
        before = set(conn.log.subscribed)
        await super()._on_request(conn, message)
        if len(conn.log.requests) > 1000:  # bounded: keep the latest requests only
            del conn.log.requests[:-100]
        for channel in sorted(conn.log.subscribed - before):
            parts = channel.split(".")
            if parts[0] not in _INSTRUMENT_KINDS:
                continue
            self._started.set()
            prefix = ".".join(parts[:2])
            if parts[0] == "book" and prefix in self._books:
                await self._send_notification(conn, channel, self._books[prefix].snapshot())
            elif prefix in self._latest and parts[0] != "book":
                await self._send_notification(conn, channel, self._latest[prefix][1])

    async def _beat(self, conn: _Conn) -> None:
        """Deribit's heartbeat: a ``test_request`` every ``set_heartbeat`` interval; a
        connection that did not answer the previous one is closed."""
        while True:
            interval = conn.log.heartbeat_interval
            if not interval or interval < 10:
                await asyncio.sleep(0.5)
                continue
            await asyncio.sleep(interval)
            if conn.unanswered > 0:
                conn.log.closed_by_server = "unanswered test_request"
                await conn.ws.close(1000, "test_request not answered")
                return
            await self._send_test_request(conn)

    async def _send_notification(self, conn: _Conn, channel: str, data: Mapping[str, Any]) -> None:
        frame = orjson.dumps(
            {
                "jsonrpc": "2.0",
                "method": "subscription",
                "params": {"channel": channel, "data": data},
            }
        ).decode()
        if await self._send(conn, frame):
            self.frames_sent += 1

    async def _send(self, conn: _Conn, frame: str | bytes) -> bool:
        if not conn.log.open:
            return False
        try:
            await conn.ws.send(frame)
        except ConnectionClosed:
            return False
        return True


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


__all__ = [
    "ConnectionLog",
    "FakeDeribitServer",
    "RecordedItem",
    "RecordingIndex",
    "RecordingServer",
    "ScriptFrame",
    "instrument_from_name",
    "instruments_from_capture",
    "notification",
    "script_from_capture",
    "synthetic_instruments",
    "synthetic_script",
    "synthetic_ticker",
    "ticker_from_quote",
]
