"""A TCP fault proxy on loopback with toxiproxy's toxics, for feed fault tests and soaks.

``FaultProxy(upstream_host, upstream_port)`` listens on ``127.0.0.1`` (port 0: any free port)
and relays every accepted connection to the upstream (the fake Deribit server, a broker),
byte for byte, through the *toxics* currently installed. Like ``deribit.fake`` this is package
code rather than a test helper: the feed tests put it between the daemon and the fake
exchange, and a soak or a demo can do the same against any TCP service without an extra
tool. Toxics (after Shopify's toxiproxy, https://github.com/Shopify/toxiproxy, "Toxics"; the
behaviour is re-done here, not its code):

* ``Latency(latency_s, jitter_s)``: every chunk waits ``latency_s`` (+ uniform jitter);
* ``Stall(close_after_s)``: toxiproxy's ``timeout``: nothing gets through any more (data is
  read and discarded), the sockets stay open: the silent peer; with ``close_after_s`` the
  connection is closed that long after the stall began;
* ``ResetPeer(after_s)``: toxiproxy's ``reset_peer``: ``after_s`` after the toxic meets a
  connection (its first byte, or at once for a live one), both sides get a TCP RST
  (``SO_LINGER`` 0, then close) instead of a FIN;
* ``SlowClose(delay_s)``: a side's close (FIN, or a reset, passed on as one) reaches the
  other side ``delay_s`` late;
* ``Slicer(average_bytes, variation_bytes, delay_s)``: every chunk is written in slices of
  about ``average_bytes`` with ``delay_s`` between them (partial frames, split headers);
* ``LimitData(max_bytes)``: toxiproxy's ``limit_data``: after ``max_bytes`` in its direction
  the connection is closed (a frame cut in the middle).

Each toxic has a ``stream`` (``"down"``: upstream to client, what a feed receives; ``"up"``:
client to upstream) and a ``toxicity`` (the probability it applies to a connection, drawn
once per connection and toxic from the proxy's seeded ``rng``). Toxics are installed and
removed at any time (``add``, ``remove``, ``clear``) and act on live connections too, at their
next chunk; ``reset_all()`` sends RSTs now. ``connections`` keeps a ``ProxyConnection`` per
accepted connection: bytes each way and how it ended, for assertions.

Each direction is one task that reads a chunk, passes it through the toxics in the order they
were added, and writes what is left, so toxics compose (latency + slicing = a slow link) and
backpressure works as on a real link: a stalled or slow direction stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog

from streamer.errors import InputError
from streamer.lifecycle import AsyncResource

log = structlog.get_logger(__name__)

Stream = Literal["down", "up"]
CHUNK = 65_536
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class _CloseError(Exception):
    """Internal: a toxic ends the connection (``how``: ``"fin"`` or ``"rst"``)."""

    def __init__(self, how: Literal["fin", "rst"], reason: str) -> None:
        super().__init__(reason)
        self.how = how
        self.reason = reason


# -- toxics ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Toxic:
    """One fault on one direction of every connection (subclasses say which)."""

    stream: Stream = "down"
    toxicity: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.stream not in ("down", "up"):
            raise InputError("stream", f"'down' or 'up', got {self.stream!r}")
        if not 0.0 <= self.toxicity <= 1.0:
            raise InputError("toxicity", f"must be in [0, 1], got {self.toxicity}")
        if not self.name:
            self.name = f"{type(self).__name__.lower()}_{self.stream}"

    async def on_data(self, conn: ProxyConnection, data: bytes, out: _Writer) -> bytes:
        """Transform one chunk (sleep, cut, swallow, or raise ``_CloseError``); returns what
        goes on to the next toxic (``b""``: nothing)."""
        return data

    async def on_close(self, conn: ProxyConnection) -> None:
        """The source side of this direction closed (FIN); runs before it is passed on."""


@dataclass(eq=False)
class Latency(Toxic):
    """Every chunk waits ``latency_s`` plus a uniform ``[0, jitter_s]``."""

    latency_s: float = 0.1
    jitter_s: float = 0.0

    async def on_data(self, conn: ProxyConnection, data: bytes, out: _Writer) -> bytes:
        await asyncio.sleep(self.latency_s + self.jitter_s * conn.rng.random())
        return data


@dataclass(eq=False)
class Stall(Toxic):
    """Nothing gets through (data is discarded), the sockets stay open; closed
    ``close_after_s`` after the stall met the connection when that is set."""

    close_after_s: float | None = None

    async def on_data(self, conn: ProxyConnection, data: bytes, out: _Writer) -> bytes:
        conn.stalled_bytes += len(data)
        if self.close_after_s is not None:
            began = conn.marks.setdefault(id(self), asyncio.get_running_loop().time())
            if asyncio.get_running_loop().time() - began >= self.close_after_s:
                raise _CloseError("fin", f"{self.name}: closed after the stall")
        return b""

    def arm(self, conn: ProxyConnection) -> None:
        """Start the stall's close timer on a connection now (the proxy calls this)."""
        if self.close_after_s is None:
            return
        conn.marks.setdefault(id(self), asyncio.get_running_loop().time())
        conn.schedule(self.close_after_s, "fin", f"{self.name}: closed after the stall")


@dataclass(eq=False)
class ResetPeer(Toxic):
    """``after_s`` after meeting a connection, both of its sockets are reset (TCP RST)."""

    after_s: float = 0.0

    def arm(self, conn: ProxyConnection) -> None:
        conn.schedule(self.after_s, "rst", f"{self.name}: reset after {self.after_s} s")


@dataclass(eq=False)
class SlowClose(Toxic):
    """A close (FIN) from the source side is passed on ``delay_s`` late."""

    delay_s: float = 1.0

    async def on_close(self, conn: ProxyConnection) -> None:
        await asyncio.sleep(self.delay_s)


@dataclass(eq=False)
class Slicer(Toxic):
    """Chunks are written in slices of ``average_bytes`` +- ``variation_bytes`` (at least
    1), ``delay_s`` apart."""

    average_bytes: int = 16
    variation_bytes: int = 8
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.average_bytes < 1 or not 0 <= self.variation_bytes < self.average_bytes:
            raise InputError(
                "average_bytes", "need average_bytes >= 1 and 0 <= variation < average"
            )

    async def on_data(self, conn: ProxyConnection, data: bytes, out: _Writer) -> bytes:
        i = 0
        while i < len(data):
            size = self.average_bytes + conn.rng.randint(
                -self.variation_bytes, self.variation_bytes
            )
            piece = data[i : i + max(1, size)]
            i += len(piece)
            if i < len(data):  # the last slice goes on through the other toxics
                await out.write(piece)
                conn.slices += 1
                if self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
            else:
                return piece
        return b""


@dataclass(eq=False)
class LimitData(Toxic):
    """After ``max_bytes`` in this direction the connection is closed (FIN both ways); the
    chunk that crosses the limit is cut there."""

    max_bytes: int = 0

    async def on_data(self, conn: ProxyConnection, data: bytes, out: _Writer) -> bytes:
        used = conn.marks.get(id(self), 0.0)
        room = self.max_bytes - int(used)
        if room <= 0:
            raise _CloseError("fin", f"{self.name}: {self.max_bytes} bytes passed")
        conn.marks[id(self)] = used + min(room, len(data))
        if len(data) >= room:
            await out.write(data[:room])
            raise _CloseError("fin", f"{self.name}: {self.max_bytes} bytes passed")
        return data


# -- connections -----------------------------------------------------------------------------


class _Writer:
    """One direction's destination, counting bytes."""

    def __init__(self, conn: ProxyConnection, stream: Stream, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.stream = stream
        self.writer = writer

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self.writer.write(data)
        await self.writer.drain()
        if self.stream == "down":
            self.conn.bytes_down += len(data)
        else:
            self.conn.bytes_up += len(data)


@dataclass(eq=False)
class ProxyConnection:
    """One relayed connection: what passed, and how it ended (``closed``: ``client`` or
    ``upstream`` closed it, or the reason a toxic or ``reset_all`` gave; ``how``: ``fin`` or
    ``rst``)."""

    index: int
    rng: random.Random
    bytes_up: int = 0
    bytes_down: int = 0
    stalled_bytes: int = 0
    slices: int = 0
    closed: str = ""
    how: str = ""
    open: bool = True
    marks: dict[int, float] = field(default_factory=dict)  # per-toxic state
    applies: dict[int, bool] = field(default_factory=dict)  # per-toxic toxicity draw
    armed: set[int] = field(default_factory=set)  # timers started (ResetPeer, Stall)
    _end: Callable[[str, str], None] | None = field(default=None, repr=False)
    _timers: list[asyncio.TimerHandle] = field(default_factory=list, repr=False)
    _pumps: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    def schedule(self, after_s: float, how: str, reason: str) -> None:
        """End the connection ``after_s`` from now (a toxic's timer)."""
        end = self._end
        if end is None or not self.open:
            return
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(max(after_s, 0.0), end, how, reason))

    def cancel_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()


class FaultProxy(AsyncResource):
    """A loopback TCP proxy to ``upstream_host:upstream_port`` with toxics (module docstring).

    Args:
        upstream_host, upstream_port: where connections are relayed to.
        host, port: where to listen (loopback; port 0: any free port).
        seed: seeds the toxicity draws, jitter and slice sizes (reproducible faults).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.rng = random.Random(seed)
        self.toxics: list[Toxic] = []
        self.connections: list[ProxyConnection] = []
        self.refused = 0  # connections whose upstream could not be reached
        self._server: asyncio.Server | None = None
        self._live: dict[ProxyConnection, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[object]] = set()  # one per accepted connection
        self._changed = asyncio.Condition()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    async def aclose(self) -> None:
        """Stop listening, end every live connection and wait for their relays to finish."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._live):
            self._end(conn, "fin", "proxy closed")
        # the handlers end by themselves once their sockets are closed (a handler task of
        # asyncio.start_server must not be cancelled: the loop would log it)
        while self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5.0)
            for conn in list(self._live):
                self._end(conn, "fin", "proxy closed")
        if server is not None:
            await server.wait_closed()

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect: ``(host, port)``."""
        if self._server is None:
            raise InputError("proxy", "not started")
        return self.host, int(self._server.sockets[0].getsockname()[1])

    def url(self, scheme: str = "ws", path: str = "/ws/api/v2") -> str:
        """``ws://127.0.0.1:PORT/ws/api/v2`` (the fake Deribit server's path by default)."""
        host, port = self.address
        return f"{scheme}://{host}:{port}{path}"

    # -- toxics -----------------------------------------------------------------------------

    def add(self, toxic: Toxic) -> Toxic:
        """Install ``toxic`` (names must be unique); it acts on live connections too."""
        if any(t.name == toxic.name for t in self.toxics):
            raise InputError("name", f"a toxic named {toxic.name!r} is installed already")
        self.toxics.append(toxic)
        for conn in self._live:
            self._arm(conn, toxic)
        return toxic

    def remove(self, name: str) -> None:
        """Uninstall the toxic ``name`` (``KeyError`` if there is none)."""
        for i, t in enumerate(self.toxics):
            if t.name == name:
                del self.toxics[i]
                return
        raise KeyError(name)

    def clear(self) -> None:
        """Uninstall every toxic (live connections flow freely again)."""
        self.toxics.clear()

    def reset_all(self) -> int:
        """Reset (TCP RST) every live connection now; how many."""
        live = list(self._live)
        for conn in live:
            self._end(conn, "rst", "reset_all")
        return len(live)

    def live(self) -> list[ProxyConnection]:
        """The connections being relayed now (upstream reached, not closed)."""
        return list(self._live)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait (at most ``timeout`` s) until ``predicate()`` holds (re-checked on every
        connection change)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def _applies(self, conn: ProxyConnection, toxic: Toxic) -> bool:
        hit = conn.applies.get(id(toxic))
        if hit is None:
            hit = conn.applies[id(toxic)] = toxic.toxicity >= 1.0 or (
                self.rng.random() < toxic.toxicity
            )
        return hit

    def _arm(self, conn: ProxyConnection, toxic: Toxic) -> None:
        """Start a toxic's timer on a connection (once)."""
        arm = getattr(toxic, "arm", None)
        if arm is None or id(toxic) in conn.armed or not self._applies(conn, toxic):
            return
        conn.armed.add(id(toxic))
        arm(conn)

    # -- relaying ---------------------------------------------------------------------------

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
            me.add_done_callback(self._handlers.discard)
        if self._server is None:  # closing
            client_w.close()
            return
        conn = ProxyConnection(len(self.connections), random.Random(self.rng.random()))
        self.connections.append(conn)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            self.refused += 1
            conn.open, conn.closed, conn.how = False, f"upstream unreachable: {exc}", "fin"
            client_w.close()
            await self._notify()
            return
        self._live[conn] = (client_w, up_w)
        conn._end = lambda how, reason: self._end(conn, how, reason)
        for toxic in self.toxics:
            self._arm(conn, toxic)
        await self._notify()
        down = asyncio.create_task(self._pump(conn, "down", up_r, client_w))
        up = asyncio.create_task(self._pump(conn, "up", client_r, up_w))
        conn._pumps = [down, up]
        await asyncio.wait({down, up}, return_when=asyncio.ALL_COMPLETED)
        if conn.open:
            self._end(conn, "fin", conn.closed or "both sides closed")
        await self._notify()

    async def _pump(
        self,
        conn: ProxyConnection,
        stream: Stream,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        out = _Writer(conn, stream, writer)
        try:
            while True:
                try:
                    data: bytes | None = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    data = None  # the source reset its side: passed on as a reset
                if not data:
                    for toxic in self._toxics(conn, stream):
                        await toxic.on_close(conn)
                    if not conn.closed:
                        side = "upstream" if stream == "down" else "client"
                        conn.closed = side if data is not None else f"{side} reset"
                    self._end(conn, "fin" if data is not None else "rst", conn.closed)
                    return
                for toxic in self._toxics(conn, stream):
                    data = await toxic.on_data(conn, data, out)
                    if not data:
                        break
                await out.write(data)
        except _CloseError as close:
            self._end(conn, close.how, close.reason)
        except (ConnectionError, OSError) as exc:
            self._end(conn, "fin", conn.closed or f"{stream}: {type(exc).__name__}")

    def _toxics(self, conn: ProxyConnection, stream: Stream) -> list[Toxic]:
        """The toxics acting on this direction of ``conn`` now (timers armed on the way)."""
        out = []
        for t in list(self.toxics):
            if t.stream == stream and self._applies(conn, t):
                self._arm(conn, t)
                out.append(t)
        return out

    def _end(self, conn: ProxyConnection, how: str, reason: str) -> None:
        """Close both sockets of ``conn`` (RST when ``how == "rst"``); idempotent."""
        pair = self._live.pop(conn, None)
        if pair is None:
            return
        conn.open = False
        if not conn.closed or how == "rst":
            conn.closed = reason
        conn.how = how
        conn.cancel_timers()
        me = asyncio.current_task()  # None in a timer callback
        for pump in conn._pumps:
            if pump is not me:
                pump.cancel()  # one sleeping in a toxic, or writing to the closed side
        for w in pair:
            if how == "rst":
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                w.transport.abort()
            else:
                w.close()
        log.debug("faultproxy_closed", index=conn.index, how=how, reason=reason)
        # wake waiters soon (not from inside a timer callback's sync context)
        with contextlib.suppress(RuntimeError):
            task = asyncio.get_running_loop().create_task(self._notify())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


__all__ = [
    "FaultProxy",
    "Latency",
    "LimitData",
    "ProxyConnection",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Stall",
    "Toxic",
]
