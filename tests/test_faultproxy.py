"""The fault proxy itself, against a plain TCP upstream on loopback: every toxic does what
toxiproxy's does (bytes through, delayed, cut, swallowed, reset), on new and live connections.

Waits are multiples of ``TICK`` (50 ms times the suite's ``UNIT``); the only time comparisons
are lower bounds (a delay toxic must delay at least its delay), which a loaded machine cannot
break.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from streamer.errors import InputError
from streamer.feeds.faultproxy import (
    FaultProxy,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Stall,
)
from tests.conftest import UNIT

TICK = 0.05 * UNIT  # seconds: this file's time step, scaled by the suite's one unit
WAIT = 60 * TICK
PAYLOAD = bytes(range(256)) * 64  # 16 KiB


class Upstream:
    """Echoes what it gets; ``send`` pushes bytes to every client; ``close_all`` FINs."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: list[asyncio.Task[object]] = []
        self.server: asyncio.Server | None = None
        self.connected = asyncio.Event()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self.handlers.append(me)
        self.writers.append(w)
        self.connected.set()
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65_536):
                w.write(data)
                await w.drain()
        w.close()

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()
        self.close_all()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=WAIT)
        await self.server.wait_closed()

    async def send(self, data: bytes) -> None:
        for w in self.writers:
            w.write(data)
            await w.drain()

    def close_all(self) -> None:
        for w in self.writers:
            w.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = await asyncio.start_server(up._handle, "127.0.0.1", 0)
    yield up
    await up.aclose()


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", upstream.port, seed=1) as p:
        yield p


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*proxy.address)


async def read_exactly(r: asyncio.StreamReader, n: int) -> bytes:
    async with asyncio.timeout(WAIT):
        return await r.readexactly(n)


async def test_bytes_pass_both_ways(proxy: FaultProxy) -> None:
    r, w = await connect(proxy)
    w.write(PAYLOAD)
    assert await read_exactly(r, len(PAYLOAD)) == PAYLOAD
    conn = proxy.connections[0]
    assert conn.bytes_up == conn.bytes_down == len(PAYLOAD) and conn.open
    w.close()
    await proxy.wait_until(lambda: not conn.open, WAIT)
    assert conn.closed == "client" and conn.how == "fin"


async def test_latency_delays_every_chunk(proxy: FaultProxy) -> None:
    proxy.add(Latency(latency_s=4 * TICK))
    r, w = await connect(proxy)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    w.write(b"ping")
    assert await read_exactly(r, 4) == b"ping"
    assert loop.time() - t0 >= 4 * TICK  # down only: the echo waited once
    proxy.add(Latency(stream="up", latency_s=4 * TICK))  # now both ways, live connection
    t0 = loop.time()
    w.write(b"pong")
    assert await read_exactly(r, 4) == b"pong"
    assert loop.time() - t0 >= 8 * TICK
    w.close()


async def test_stall_swallows_data_and_keeps_the_socket_open(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    r, w = await connect(proxy)
    w.write(b"a")
    assert await read_exactly(r, 1) == b"a"
    proxy.add(Stall())
    await upstream.send(b"lost")
    with pytest.raises(TimeoutError):  # silence, not EOF: the socket is open
        async with asyncio.timeout(6 * TICK):
            await r.read(1)
    conn = proxy.connections[0]
    await proxy.wait_until(lambda: conn.stalled_bytes == 4, WAIT)
    assert conn.open and conn.bytes_down == 1
    proxy.remove("stall_down")
    await upstream.send(b"back")
    assert await read_exactly(r, 4) == b"back"
    w.close()


async def test_stall_with_close_after(proxy: FaultProxy) -> None:
    proxy.add(Stall(close_after_s=3 * TICK))
    r, w = await connect(proxy)
    conn = proxy.connections[0]
    async with asyncio.timeout(WAIT):
        assert await r.read() == b""  # closed by the stall's timer, no byte through
    assert conn.closed.startswith("stall_down") and conn.bytes_down == 0
    w.close()


async def test_reset_peer_sends_rst(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.add(ResetPeer(after_s=2 * TICK))
    r, w = await connect(proxy)
    await upstream.connected.wait()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(WAIT):
            while await r.read(65_536):
                pass
    conn = proxy.connections[0]
    assert conn.how == "rst" and not conn.open
    w.close()


async def test_reset_all_resets_live_connections_only(proxy: FaultProxy) -> None:
    pairs = [await connect(proxy) for _ in range(3)]
    await proxy.wait_until(lambda: len(proxy.live()) == 3, WAIT)
    assert proxy.reset_all() == 3
    for r, w in pairs:
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT):
                await r.read(1)
        w.close()
    r, w = await connect(proxy)  # the proxy still relays
    w.write(b"x")
    assert await read_exactly(r, 1) == b"x"
    w.close()


async def test_slow_close_delays_the_fin(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.add(SlowClose(delay_s=5 * TICK))
    r, w = await connect(proxy)
    await upstream.connected.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    upstream.close_all()
    async with asyncio.timeout(WAIT):
        assert await r.read() == b""
    assert loop.time() - t0 >= 5 * TICK
    w.close()


async def test_slicer_splits_writes_and_keeps_the_bytes(proxy: FaultProxy) -> None:
    proxy.add(Slicer(average_bytes=7, variation_bytes=3, delay_s=0.0))
    r, w = await connect(proxy)
    w.write(PAYLOAD)
    assert await read_exactly(r, len(PAYLOAD)) == PAYLOAD
    conn = proxy.connections[0]
    assert conn.slices >= len(PAYLOAD) // 10  # slices of 4..10 bytes
    w.close()


async def test_limit_data_cuts_the_stream(proxy: FaultProxy) -> None:
    proxy.add(LimitData(max_bytes=1000))
    r, w = await connect(proxy)
    w.write(PAYLOAD)
    async with asyncio.timeout(WAIT):
        got = await r.read()  # to EOF
    assert got == PAYLOAD[:1000]
    assert proxy.connections[0].closed.startswith("limitdata_down")
    w.close()


async def test_toxicity_zero_never_applies_and_names_are_unique(proxy: FaultProxy) -> None:
    proxy.add(Stall(toxicity=0.0))
    with pytest.raises(InputError):
        proxy.add(Stall())
    with pytest.raises(InputError):
        Latency(stream="sideways")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        Slicer(average_bytes=2, variation_bytes=2)
    r, w = await connect(proxy)
    w.write(b"ok")
    assert await read_exactly(r, 2) == b"ok"
    w.close()
    with pytest.raises(KeyError):
        proxy.remove("nothing")


async def test_unreachable_upstream_is_counted() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with FaultProxy("127.0.0.1", port) as proxy:
        r, w = await connect(proxy)
        async with asyncio.timeout(WAIT):
            assert await r.read() == b""
        assert proxy.refused == 1 and "unreachable" in proxy.connections[0].closed
        w.close()
