"""``streamer fake-deribit``: recordings served as a live Deribit websocket, end to end.

The server (``streamer.feeds.deribit.fake.RecordingServer``) is checked in process with a
plain websockets client speaking JSON-RPC (listing, subscriptions, the recorded frames and
their order, loops with shifted timestamps, a late subscriber's snapshot, heartbeats, Tardis
CSVs priced from their IVs); then the whole offline chain as a user runs it: a
``streamer fake-deribit`` process -> a ``streamer run`` process -> a real mosquitto -> a
subscriber that sees surfaces whose ATM vols match the recording's ground truth, and the
daemon's own live page ([web] listen) serving them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from streamer.feeds.deribit.fake import LOOP_GAP_NS, RecordingIndex, RecordingServer
from streamer.feeds.recordings.reader import read_frames
from streamer.instruments import parse_option
from streamer.pricing import black_price
from tests.conftest import REPO, UNIT
from tests.mosquitto import Mosquitto

CALM = REPO / "replay_data" / "calm.jsonl.zst"
TRUTH = REPO / "replay_data" / "calm.truth.json"
ENV = {
    **os.environ,
    "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(REPO / ".numba_cache")),
    "PYTHONUNBUFFERED": "1",
}


def cut_recording(dst: Path, seconds: float, src: Path = CALM) -> Path:
    """The first ``seconds`` of a recording, as a plain .jsonl recording."""
    first: int | None = None
    with dst.open("wb") as out:
        for ts_ns, venue, frame in read_frames(src):
            first = ts_ns if first is None else first
            if ts_ns - first > seconds * 1e9:
                break
            out.write(orjson.dumps({"ts_ns": ts_ns, "venue": venue, "frame": frame}) + b"\n")
    return dst


@pytest.fixture(scope="module")
def calm_minute(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cut_recording(tmp_path_factory.mktemp("rec") / "calm-60s.jsonl", 60.0)


def write_recording(path: Path, frames: list[tuple[int, dict[str, Any]]]) -> Path:
    with path.open("wb") as out:
        for ts_ns, msg in frames:
            line = {"ts_ns": ts_ns, "venue": "deribit", "frame": json.dumps(msg)}
            out.write(orjson.dumps(line) + b"\n")
    return path


def ticker_frame(name: str, ts_ms: int, bid: float) -> dict[str, Any]:
    data = {
        "timestamp": ts_ms,
        "instrument_name": name,
        "best_bid_price": bid,
        "best_ask_price": bid + 0.001,
        "best_bid_amount": 1.0,
        "best_ask_amount": 1.0,
        "bid_iv": 50.0,
        "ask_iv": 52.0,
        "mark_iv": 51.0,
        "underlying_price": 90000.0,
    }
    return {
        "jsonrpc": "2.0",
        "method": "subscription",
        "params": {"channel": f"ticker.{name}.100ms", "data": data},
    }


class Client:
    """A bare JSON-RPC client: requests by id, notifications queued in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.notes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.heartbeats: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if msg.get("method") == "subscription":
                await self.notes.put(msg["params"])
            elif msg.get("method") == "heartbeat":
                await self.heartbeats.put(msg["params"])
            elif "id" in msg and msg["id"] in self._waiters:
                self._waiters.pop(msg["id"]).set_result(msg)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[self.next_id] = fut
        req = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        await self.ws.send(json.dumps(req))
        return await asyncio.wait_for(fut, 5 * UNIT)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.ws.close()


@contextlib.asynccontextmanager
async def client_of(server: RecordingServer) -> AsyncIterator[Client]:
    async with connect(server.url, max_size=None) as ws:
        c = Client(ws)
        try:
            yield c
        finally:
            await c.close()


# -- the server, in process ----------------------------------------------------------------


def test_index_lists_the_recordings_own_instruments(calm_minute: Path) -> None:
    first = json.loads(next(read_frames(calm_minute))[2])  # the recorded get_instruments reply
    listed = {row["instrument_name"] for row in first["result"]}
    index = RecordingIndex.scan([calm_minute])
    assert set(index.initial) == listed
    assert len(listed) == 652
    assert index.notifications == sum(1 for _ in read_frames(calm_minute)) - 1


def test_index_refuses_a_missing_or_empty_file(tmp_path: Path) -> None:
    from streamer.errors import InputError

    with pytest.raises(InputError, match="no such file"):
        RecordingIndex.scan([tmp_path / "nope.jsonl"])
    empty = write_recording(tmp_path / "empty.jsonl", [(1, {"jsonrpc": "2.0", "id": 1})])
    with pytest.raises(InputError, match="no Deribit notifications"):
        RecordingIndex.scan([empty])


async def test_listing_subscriptions_and_recorded_frames_in_order(calm_minute: Path) -> None:
    index = RecordingIndex.scan([calm_minute])
    names = sorted(index.initial)[:3]
    wanted = {f"ticker.{n}.100ms" for n in names} | {"deribit_price_index.btc_usd"}
    expected = []  # what the recording says, in order, on those channels
    for _ts, _v, frame in read_frames(calm_minute):
        msg = json.loads(frame)
        if msg.get("method") == "subscription" and msg["params"]["channel"] in wanted:
            expected.append((msg["params"]["channel"], msg["params"]["data"]))
    async with RecordingServer(index, speed=200.0) as server, client_of(server) as c:
        listing = await c.call("public/get_instruments", currency="BTC", kind="option")
        assert {row["instrument_name"] for row in listing["result"]} == set(index.initial)
        reply = await c.call("public/subscribe", channels=[*sorted(wanted), "ticker.NOPE.100ms"])
        assert set(reply["result"]) == wanted  # the unknown instrument is left out
        got: list[tuple[str, Any]] = []
        async with asyncio.timeout(30 * UNIT):
            while len(got) < len(expected):
                note = await c.notes.get()
                got.append((note["channel"], note["data"]))
        assert got == expected


async def test_loop_shifts_timestamps_by_the_recordings_length(tmp_path: Path) -> None:
    name = "BTC-27MAR26-100000-C"
    t0 = 1_772_442_000_000_000_000
    frames = [
        (t0 + k * 100_000_000, ticker_frame(name, t0 // 10**6 + 100 * k, 0.01 * k))
        for k in range(3)
    ]
    rec = write_recording(tmp_path / "three.jsonl", frames)
    index = RecordingIndex.scan([rec])
    shift_ms = (200_000_000 + LOOP_GAP_NS) // 1_000_000  # span of the recording + the gap
    async with RecordingServer(index, speed=20.0, loop=True) as server, client_of(server) as c:
        await c.call("public/subscribe", channels=[f"ticker.{name}.100ms"])
        stamps: list[int] = []
        async with asyncio.timeout(20 * UNIT):
            while len(stamps) < 7:
                stamps.append((await c.notes.get())["data"]["timestamp"])
    first = [f[1]["params"]["data"]["timestamp"] for f in frames]
    assert stamps == first + [t + shift_ms for t in first] + [first[0] + 2 * shift_ms]


async def test_a_late_subscriber_gets_the_latest_ticker_at_once(tmp_path: Path) -> None:
    name = "BTC-27MAR26-100000-C"
    t0 = 1_772_442_000_000_000_000
    frames = [(t0, ticker_frame(name, t0 // 10**6, 0.0123))]
    frames.append((t0 + 3600 * 10**9, ticker_frame(name, t0 // 10**6 + 3_600_000, 0.02)))
    index = RecordingIndex.scan([write_recording(tmp_path / "two.jsonl", frames)])
    channel = f"ticker.{name}.100ms"
    async with RecordingServer(index, speed=1.0) as server, client_of(server) as first:
        await first.call("public/subscribe", channels=[channel])
        note = await asyncio.wait_for(first.notes.get(), 5 * UNIT)
        assert note["data"]["best_bid_price"] == 0.0123
        async with client_of(server) as late:  # the next frame is an hour away
            await late.call("public/subscribe", channels=[channel.replace("100ms", "raw")])
            snap = await asyncio.wait_for(late.notes.get(), 5 * UNIT)
            assert snap["channel"] == channel.replace("100ms", "raw")
            assert snap["data"]["best_bid_price"] == 0.0123


@pytest.mark.slow
async def test_heartbeat_test_requests_after_set_heartbeat(tmp_path: Path) -> None:
    name = "BTC-27MAR26-100000-C"
    frames = [(10**18, ticker_frame(name, 10**12, 0.01))]
    index = RecordingIndex.scan([write_recording(tmp_path / "one.jsonl", frames)])
    async with RecordingServer(index) as server, client_of(server) as c:
        refused = await c.call("public/set_heartbeat", interval=5)
        assert refused["error"]["code"] == -32602  # Deribit's minimum is 10 s
        assert (await c.call("public/set_heartbeat", interval=10))["result"] == "ok"
        beat = await asyncio.wait_for(c.heartbeats.get(), 10 + 10 * UNIT)
        assert beat["type"] == "test_request"


async def test_tardis_csv_as_tickers_priced_from_their_ivs(tmp_path: Path) -> None:
    """The hourly cut keeps IVs but no prices: each side is priced by Black-76 (coin)."""
    ts_us = 1_735_718_400_000_000  # 2025-01-01 08:00 UTC
    expiry_us = 1_743_148_800_000_000  # 28MAR25 08:00 UTC
    csv = tmp_path / "hourly.csv"
    csv.write_text(
        "ts_us,asset,expiry_us,strike,opt_type,mark_iv,bid_iv,ask_iv,mark_price,"
        "underlying_price,delta,open_interest\n"
        f"{ts_us},btc,{expiry_us},100000,call,55.5,54.0,57.0,0.08,95000,0.4,10\n"
        f"{ts_us},btc,{expiry_us},90000,put,58.0,56.5,0,0.05,95000,-0.3,5\n"
    )
    index = RecordingIndex.scan([csv])
    assert set(index.initial) == {"BTC-28MAR25-100000-C", "BTC-28MAR25-90000-P"}
    async with RecordingServer(index, speed=1.0) as server, client_of(server) as c:
        await c.call("public/subscribe", channels=[f"ticker.{n}.100ms" for n in index.initial])
        notes = [await asyncio.wait_for(c.notes.get(), 5 * UNIT) for _ in range(2)]
    by_name = {n["data"]["instrument_name"]: n["data"] for n in notes}
    T = (expiry_us - ts_us) / 1e6 / (365 * 86400)
    call = by_name["BTC-28MAR25-100000-C"]
    want_bid = float(black_price(95000.0, 100000.0, T, 0.54, True)) / 95000.0
    want_ask = float(black_price(95000.0, 100000.0, T, 0.57, True)) / 95000.0
    assert math.isclose(call["best_bid_price"], want_bid, rel_tol=1e-6)
    assert math.isclose(call["best_ask_price"], want_ask, rel_tol=1e-6)
    assert (call["bid_iv"], call["ask_iv"], call["mark_iv"]) == (54.0, 57.0, 55.5)
    put = by_name["BTC-28MAR25-90000-P"]
    assert put["best_ask_price"] == 0.0 and put["ask_iv"] == 0.0  # no ask: Deribit's zero
    assert put["best_bid_price"] > 0


# -- the command, end to end ---------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=REPO,
    )


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    """Read ``proc``'s output lines until one matches ``pattern`` (a thread keeps reading)."""
    assert proc.stdout is not None
    rx = re.compile(pattern)
    seen: list[str] = []

    async def scan() -> re.Match[str]:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, proc.stdout.readline)  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"process ended before {pattern!r}: {''.join(seen)[-3000:]}")
            seen.append(line)
            m = rx.search(line)
            if m:
                return m

    async def bounded() -> re.Match[str]:
        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no {pattern!r} in {timeout} s: {''.join(seen)[-3000:]}"
            ) from None

    return asyncio.run(bounded())


_DRAINS: dict[int, threading.Thread] = {}


@contextlib.contextmanager
def running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``proc`` is stopped (SIGTERM, then SIGKILL) and its pipe closed on the way out."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10 * UNIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        drain = _DRAINS.pop(proc.pid, None)
        if drain is not None:
            drain.join(timeout=10 * UNIT)
        if proc.stdout is not None:
            proc.stdout.close()


def _drain(proc: subprocess.Popen[str]) -> None:
    """Keep reading a process's output in a thread, so it never blocks on a full pipe."""

    def pump() -> None:
        assert proc.stdout is not None
        for _line in proc.stdout:
            pass

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    _DRAINS[proc.pid] = thread


def test_command_refuses_bad_input(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "streamer", "fake-deribit", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60 * UNIT,
        check=False,
    )
    assert missing.returncode == 2
    assert "no such file" in missing.stderr
    bad_speed = subprocess.run(
        [sys.executable, "-m", "streamer", "fake-deribit", str(CALM), "--speed", "0"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60 * UNIT,
        check=False,
    )
    assert bad_speed.returncode == 2
    assert "--speed" in bad_speed.stderr


@pytest.mark.slow
def test_fake_exchange_daemon_broker_subscriber(
    mosquitto: Mosquitto, calm_minute: Path, tmp_path: Path
) -> None:
    """fake-deribit process -> streamer run process -> mosquitto -> a subscriber (and the
    daemon's own page): surfaces of every recorded expiry, ATM vols as the ground truth."""
    fake = _spawn("fake-deribit", str(calm_minute), "--port", "0", "--speed", "2")
    with running(fake):
        url = _read_until(fake, r"serving (ws://127\.0\.0\.1:\d+/ws/api/v2)", 60 * UNIT)[1]
        _drain(fake)
        config = tmp_path / "daemon.toml"
        config.write_text(
            'instance = "fake-e2e"\n'
            f'[feed]\nurl = "{url}"\ncurrencies = ["BTC"]\n'
            '[models]\nnames = ["svi"]\n'
            f'[publish]\nurls = ["mqtt://{mosquitto.host}:{mosquitto.port}/streamer"]\n'
            '[web]\nlisten = "127.0.0.1:0"\n'
            '[log]\nlevel = "info"\nformat = "json"\n'
        )
        daemon = _spawn("run", "--config", str(config))
        with running(daemon):
            page = _read_until(daemon, r'"url": "(http://127\.0\.0\.1:\d+/)"', 120 * UNIT)[1]
            _drain(daemon)
            surfaces, view = asyncio.run(_watch(mosquitto, page))
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=20 * UNIT) == 0
    listed = {
        opt.expiry
        for row in json.loads(next(read_frames(calm_minute))[2])["result"]
        if (opt := parse_option(row["instrument_name"])) is not None
    }
    assert len(surfaces) >= 2 and all(s["status"] == "ok" for s in surfaces)
    assert surfaces[-1]["seq"] > surfaces[0]["seq"]
    last = surfaces[-1]
    assert {e["expiry"] for e in last["expiries"]} == listed
    truth = json.loads(TRUTH.read_text())["path"]
    at = min(truth, key=lambda p: abs(p["ts_ms"] - last["ts_ms"]))  # 10 s of feed time apart
    want = {e["expiry"]: e["atm_iv"] for e in at["expiries"]}
    for e in last["expiries"]:
        if e["T"] * 365 >= 7:  # the simulator's surface; the fit within a vol point
            assert abs(e["atm_iv"] - want[e["expiry"]]) < 0.01, e["expiry"]
    assert view["surface"]["seq"] >= surfaces[0]["seq"]  # the daemon's own page has them
    assert {e["expiry"] for e in view["expiries"]} == listed


async def _watch(mosquitto: Mosquitto, page: str) -> tuple[list[dict[str, Any]], Any]:
    from streamer.client.subscribe import subscribe_payloads

    surfaces: list[dict[str, Any]] = []
    broker = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    async with asyncio.timeout(120 * UNIT):
        async with contextlib.aclosing(
            subscribe_payloads(broker, "streamer/deribit/BTC/svi/surface")
        ) as messages:
            async for _topic, payload in messages:
                surfaces.append(payload)
                if len(surfaces) >= 3:
                    break
        async with (
            aiohttp.ClientSession() as http,
            http.get(page + "api/view?key=deribit/BTC/svi") as resp,
        ):
            assert resp.status == 200
            view = (await resp.json())["view"]
    return surfaces, view
