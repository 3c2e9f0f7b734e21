"""The Prometheus endpoint over a real socket: loopback by default, GET /metrics only, bounded.

Requests are written byte by byte with plain sockets (no HTTP client library that would tidy
them up), so what the server answers to oversized, malformed and slow requests is what a
hostile client would see.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from streamer.config import load_config
from streamer.daemon.metrics import MAX_HEAD_BYTES, Registry, serve
from streamer.errors import ConfigError
from tests.conftest import UNIT

TIMEOUT = 10.0 * UNIT


def registry() -> Registry:
    reg = Registry()
    reg.frames.set(42.0)
    reg.feed_up.set(1.0)
    return reg


@pytest.fixture
async def server() -> AsyncIterator[int]:
    srv = await serve(registry(), "127.0.0.1", 0, request_timeout=0.5 * UNIT)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request``, read until the server closes; the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            return await reader.read(-1)
    finally:
        writer.close()


def status_line(response: bytes) -> str:
    return response.split(b"\r\n", 1)[0].decode()


async def test_get_metrics_answers_the_exposition(server: int) -> None:
    response = await exchange(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_line(response) == "HTTP/1.0 200 OK"
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert b"\nstreamer_frames_total 42\n" in body and b"streamer_feed_up 1" in body
    # a query string is fine (Prometheus may add one); HEAD has no body
    assert status_line(await exchange(server, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")).endswith(
        "200 OK"
    )
    head_only = await exchange(server, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status_line(head_only).endswith("200 OK") and head_only.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"GET /metrics/../etc HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"GET /admin HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405 Method Not Allowed"),
        (b"DELETE /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", "413 Content Too Large"),
        (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "413 Content Too Large"),
        (b"GARBAGE\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics SPDY/3\r\n\r\n", "400 Bad Request"),
        (b"GET /" + b"a" * (MAX_HEAD_BYTES + 10) + b" HTTP/1.1\r\n\r\n", "431"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"b" * MAX_HEAD_BYTES + b"\r\n\r\n", "431"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n", "431"),
    ],
)
async def test_refuses_what_is_not_a_small_get_of_metrics(
    server: int, request_bytes: bytes, status: str
) -> None:
    response = await exchange(server, request_bytes)
    assert status_line(response).startswith(f"HTTP/1.0 {status}"), response[:200]
    assert b"streamer_frames_total" not in response
    assert b"Connection: close" in response


async def test_slow_client_is_cut_off_at_the_deadline(server: int) -> None:
    """A client that trickles its request (slow loris) is answered 408 and disconnected at the
    request deadline (0.5 s here), however often it sends a byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    sent = 0
    try:
        closed = asyncio.create_task(reader.read(-1))
        async with asyncio.timeout(TIMEOUT):
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"z" * 10_000:
                if closed.done():
                    break
                writer.write(bytes([byte]))
                sent += 1
                await asyncio.sleep(0.02)
            response = await closed
    finally:
        writer.close()
    assert status_line(response) == "HTTP/1.0 408 Request Timeout"
    assert sent < 10_000  # cut off long before the request was over


async def test_the_answer_survives_a_client_that_keeps_sending(server: int) -> None:
    """A request followed by bytes the server does not read (a body it refuses, a client
    still trickling): the answer arrives whole, then the end of the stream. Closing with
    those bytes unread would reset the connection and lose the answer in the client's
    buffers; the server half-closes and drops them for a while first (``LINGER_S``)."""
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", server)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" + b"z" * 200_000)
            async with asyncio.timeout(TIMEOUT):
                response = await reader.read(-1)  # raises if the connection was reset
        finally:
            writer.close()
        assert status_line(response) == "HTTP/1.0 200 OK"


async def test_idle_connection_is_closed(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        async with asyncio.timeout(TIMEOUT):
            response = await reader.read(-1)
    finally:
        writer.close()
    assert status_line(response) == "HTTP/1.0 408 Request Timeout"


async def test_too_many_clients_are_closed_at_once() -> None:
    srv = await serve(registry(), "127.0.0.1", 0, request_timeout=5.0 * UNIT, max_clients=2)
    port = srv.sockets[0].getsockname()[1]
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(2.0 * UNIT):  # well before the 5 s request timeout
            assert await reader.read(-1) == b""
        writer.close()
        # the held ones are still served
        held[0][1].write(b"GET /metrics HTTP/1.1\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            assert status_line(await held[0][0].read(-1)).endswith("200 OK")
    finally:
        for _, w in held:
            w.close()
        srv.close()
        await srv.wait_closed()


async def test_non_loopback_bind_needs_allow_remote() -> None:
    with pytest.raises(ConfigError, match="allow_remote"):
        await serve(registry(), "0.0.0.0", 0)
    with structlog.testing.capture_logs() as logs:
        srv = await serve(registry(), "0.0.0.0", 0, allow_remote=True)
    try:
        assert [e["log_level"] for e in logs if e["event"] == "metrics_remote_bind"] == ["warning"]
        port = srv.sockets[0].getsockname()[1]
        assert status_line(await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")).endswith(
            "200 OK"
        )
    finally:
        srv.close()
        await srv.wait_closed()
    for host in ("127.0.0.2", "localhost"):  # loopback in other spellings: no flag needed
        with structlog.testing.capture_logs() as logs:
            srv = await serve(registry(), host, 0)
        srv.close()
        await srv.wait_closed()
        assert not logs


def test_metrics_settings_refuse_remote_hosts_unless_allowed(tmp_path: Path) -> None:
    assert load_config(None, env={}).metrics.host == "127.0.0.1"
    cfg = tmp_path / "m.toml"
    cfg.write_text('[metrics]\nhost = "0.0.0.0"\nport = 9108\n')
    with pytest.raises(ConfigError, match="allow_remote = true"):
        load_config(cfg, env={})
    cfg.write_text('[metrics]\nhost = "0.0.0.0"\nport = 9108\nallow_remote = true\n')
    loaded = load_config(cfg, env={})
    assert loaded.metrics.allow_remote and loaded.metrics.host == "0.0.0.0"
    cfg.write_text('[metrics]\nhost = "::1"\nport = 70000\n')
    with pytest.raises(ConfigError, match="65535"):
        load_config(cfg, env={})
    with pytest.raises(ConfigError, match="allow_remote"):
        load_config(None, env={"STREAMER__METRICS__HOST": "10.0.0.1"})


async def test_each_scrape_sees_the_values_of_its_moment() -> None:
    """The registry's ``on_scrape`` hook runs before each answer: a counter kept elsewhere
    (the service's plain ints) is current at every scrape, not as of the last tick; a hook
    that raises is logged and the scrape still answers with the last values."""
    reg = Registry()
    seen = [0]

    def refresh() -> None:
        seen[0] += 5
        if seen[0] > 10:
            raise RuntimeError("boom")
        reg.frames.set(float(seen[0]))

    reg.on_scrape = refresh
    srv = await serve(reg, "127.0.0.1", 0, request_timeout=0.5 * UNIT)
    port = srv.sockets[0].getsockname()[1]
    try:
        bodies = []
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                response = await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
                assert status_line(response) == "HTTP/1.0 200 OK"
                bodies.append(response.partition(b"\r\n\r\n")[2])
    finally:
        srv.close()
        await srv.wait_closed()
    assert b"\nstreamer_frames_total 5\n" in bodies[0]
    assert b"\nstreamer_frames_total 10\n" in bodies[1]
    assert b"\nstreamer_frames_total 10\n" in bodies[2]  # the hook failed: the last value
    assert [e["event"] for e in logs] == ["metrics_refresh_failed"]
