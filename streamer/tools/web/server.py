"""The live page's HTTP server (aiohttp): the page, its data as JSON, live updates as SSE.

Routes (all GET; nothing on the page or here writes anything)::

    /                         the page (static/index.html)
    /static/{app.js,style.css}
    /static/plotly.min.js     Plotly.js as shipped inside the installed ``plotly`` wheel
                              (never a CDN: the machines have no internet)
    /api/info                 mode (live | file), source, keys, history length, steps per key
    /api/view?key=K[&step=i]  what the page draws for key K (``state.build_view``); in file
                              mode at surface ``i`` of K, with the shards as of then
    /api/history?key=K        K's history rows (fit diagnostics, parameters, tenors)
    /api/events?key=K         live mode: Server-Sent Events, see below

The live stream (``text/event-stream``, ``retry: 2000`` so a browser reconnects by itself):
``hello`` (as ``/api/info``), then, at most every ``push_interval_s`` and only when
something changed, ``view`` (the view of K and the history rows the page has not had yet;
the first one after (re)connecting has ``reset: true`` and the whole history), ``shards``
(every status topic) and ``keys`` (the keys seen); a comment every ``PING_S`` keeps proxies
and the browser from timing out. Views are built off the event loop (``asyncio.to_thread``,
on a consistent copy of the inputs) and shared between clients per key version.

``serve(app, host, port)`` binds it; ``WebApp.live(state)`` serves a ``WebState`` (filled by
``follow`` from a broker, or by ``streamer.tools.web.publisher.WebPublisher`` inside the
daemon), ``WebApp.replay(timeline)`` a replay's output file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from streamer.errors import ConfigError
from streamer.settings import is_loopback
from streamer.tools.web.state import Key, ViewInputs, WebState, build_view, parse_key
from streamer.tools.web.timeline import Timeline

log = structlog.get_logger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8808"
PUSH_INTERVAL_S = 1.0
PING_S = 15.0
STATIC = ("index.html", "app.js", "style.css")
_CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_listen(listen: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port). A host that is not loopback
    is refused unless ``allow_remote`` (ConfigError names the option)."""
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError("listen", f"expected HOST:PORT (e.g. {DEFAULT_LISTEN}), got {listen!r}")
    if not allow_remote and not is_loopback(host):
        raise ConfigError(
            "listen",
            f"{host!r} is not a loopback address: the page (no login) would be open to the "
            "network; allow it explicitly (--allow-remote, [web] allow_remote = true)",
        )
    return host, int(port_text)


def plotly_js() -> Path:
    """The Plotly.js bundle inside the installed ``plotly`` package."""
    spec = importlib.util.find_spec("plotly")
    locations = list(spec.submodule_search_locations or ()) if spec else []
    for where in locations:
        path = Path(where) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    raise ConfigError(
        "plotly",
        "Plotly.js not found: install the page's dependencies (pip install 'streamer[web]')",
    )


def _static(name: str) -> bytes:
    return resources.files("streamer.tools.web").joinpath("static", name).read_bytes()


def _json(data: Any) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
    return web.Response(body=body, content_type="application/json")


def _sse(event: str, data: Any) -> bytes:
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
    return b"event: " + event.encode() + b"\ndata: " + body + b"\n\n"


class WebApp:
    """The page's server over a live ``WebState`` or a replay ``Timeline``."""

    def __init__(
        self,
        *,
        state: WebState | None = None,
        timeline: Timeline | None = None,
        source: str = "",
        push_interval_s: float = PUSH_INTERVAL_S,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        if (state is None) == (timeline is None):
            raise ValueError("give a live state or a timeline")
        self.state = state
        self.timeline = timeline
        self.source = source
        self.push_interval_s = push_interval_s
        self.clock = clock
        self.clients = 0
        self._views: dict[Key, tuple[int, dict[str, Any]]] = {}
        self._building: dict[Key, asyncio.Task[dict[str, Any]]] = {}
        self._plotly: bytes | None = None
        self._static: dict[str, bytes] = {}

    @classmethod
    def live(cls, state: WebState, source: str = "", **kw: Any) -> WebApp:
        return cls(state=state, source=source, **kw)

    @classmethod
    def replay(cls, timeline: Timeline, **kw: Any) -> WebApp:
        return cls(timeline=timeline, source=timeline.path, **kw)

    @property
    def mode(self) -> str:
        return "live" if self.state is not None else "file"

    def application(self) -> web.Application:
        self._plotly = plotly_js().read_bytes()  # fails early, naming the missing extra
        self._static = {name: _static(name) for name in STATIC}
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._file)
        app.router.add_get("/api/info", self._info)
        app.router.add_get("/api/view", self._view)
        app.router.add_get("/api/history", self._history)
        app.router.add_get("/api/events", self._events)
        app.cleanup_ctx.append(self._warm_views)
        return app

    async def _warm_views(self, app: web.Application) -> AsyncIterator[None]:
        """In the background, build each key's first view as soon as it has data: the first
        build loads the model's compiled kernels (seconds on a cold machine), so that a
        page opened later is drawn at once."""

        async def warm() -> None:
            done: set[Key] = set()
            while True:
                keys = list(self.state.keys) if self.state is not None else []
                if self.timeline is not None:
                    keys = list(self.timeline.keys)
                for key in keys:
                    if key in done:
                        continue
                    if self.state is not None and self.state.keys[key].surface is None:
                        continue  # no model to evaluate yet
                    done.add(key)
                    with contextlib.suppress(Exception):  # a bad payload: the page says so
                        if self.state is not None:
                            await self.live_view(key)
                        elif self.timeline is not None:
                            last = self.timeline.steps(key) - 1
                            inputs = self.timeline.inputs(key, last)
                            if inputs is not None:
                                await asyncio.to_thread(build_view, inputs)
                await asyncio.sleep(1.0)

        task = asyncio.create_task(warm(), name="web-warm-views")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- static -------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._static["index.html"],
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "plotly.min.js" and self._plotly is not None:
            return web.Response(
                body=self._plotly,
                content_type="text/javascript",
                charset="utf-8",
                headers={"Cache-Control": "max-age=86400"},
            )
        if name not in self._static:
            raise web.HTTPNotFound()
        suffix = name[name.rfind(".") :]
        return web.Response(
            body=self._static[name],
            content_type=_CONTENT_TYPES[suffix],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    # -- data ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "source": self.source, "now_ms": self.clock()}
        if self.state is not None:
            out.update(
                keys=self.state.key_names(),
                history=self.state.history,
                shards=self.state.shards_json(),
                messages=self.state.messages,
            )
        elif self.timeline is not None:
            tl = self.timeline
            out.update(
                keys=tl.key_names(),
                history=max((tl.steps(k) for k in tl.keys), default=0),
                steps={"/".join(k): tl.steps(k) for k in tl.keys},
                shards=[],
            )
        return out

    async def _info(self, request: web.Request) -> web.Response:
        return _json(self.info())

    def _key(self, request: web.Request) -> Key:
        key = parse_key(request.query.get("key", ""))
        if key is None:
            raise web.HTTPBadRequest(text="key=VENUE/UNDERLYING/MODEL")
        return key

    async def live_view(self, key: Key) -> dict[str, Any] | None:
        """The current view of ``key`` (cached per version; built in a worker thread)."""
        assert self.state is not None
        ks = self.state.keys.get(key)
        if ks is None:
            return None
        cached = self._views.get(key)
        if cached is not None and cached[0] == ks.version:
            return cached[1]
        version = ks.version
        task = self._building.get(key)
        if task is None:
            inputs = self.state.inputs(key)
            assert inputs is not None
            task = asyncio.ensure_future(asyncio.to_thread(build_view, inputs))
            self._building[key] = task
            task.add_done_callback(lambda _t: self._building.pop(key, None))
        view = await asyncio.shield(task)
        self._views[key] = (version, view)
        return view

    async def _view(self, request: web.Request) -> web.Response:
        key = self._key(request)
        if self.state is not None:
            view = await self.live_view(key)
            if view is None:
                raise web.HTTPNotFound(text=f"no data for {'/'.join(key)} (yet)")
            return _json({"view": view, "now_ms": self.clock()})
        assert self.timeline is not None
        try:
            step = int(request.query.get("step", "-1"))
        except ValueError:
            raise web.HTTPBadRequest(text="step must be an integer") from None
        steps = self.timeline.steps(key)
        if steps == 0:
            raise web.HTTPNotFound(text=f"no surfaces of {'/'.join(key)} in the file")
        step = steps - 1 if step < 0 else min(step, steps - 1)
        inputs = self.timeline.inputs(key, step)
        assert inputs is not None
        view = await asyncio.to_thread(build_view, inputs)
        return _json(
            {
                "view": view,
                "step": step,
                "steps": steps,
                "shards": self.timeline.shards(key, step),
                "now_ms": view["surface"]["ts_ms"] if view["surface"] else 0,
            }
        )

    async def _history(self, request: web.Request) -> web.Response:
        key = self._key(request)
        if self.state is not None:
            ks = self.state.keys.get(key)
            if ks is None:
                raise web.HTTPNotFound(text=f"no data for {'/'.join(key)} (yet)")
            return _json(ks.history_json())
        assert self.timeline is not None
        fits = self.timeline.fits(key)
        tenors = self.timeline.tenor_rows(key)
        return _json(
            {
                "fits": [r.to_json() for r in fits],
                "tenors": [r.to_json() for r in tenors],
                "last_fit": len(fits),
                "last_tenor": len(tenors),
            }
        )

    # -- the live stream ------------------------------------------------------------------

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self.state is None:
            raise web.HTTPNotFound(text="no live stream: this page shows a file")
        key = parse_key(request.query.get("key", ""))
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        self.clients += 1
        try:
            await self._stream(resp, key)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self.clients -= 1
        return resp

    async def _stream(self, resp: web.StreamResponse, key: Key | None) -> None:
        state = self.state
        assert state is not None
        await resp.write(b"retry: 2000\n\n" + _sse("hello", self.info()))
        sent_version = sent_shards = sent_keys = -1
        last_fit = last_tenor = 0
        reset = True
        last_write = time.monotonic()
        while True:
            chunks: list[bytes] = []
            if state.keys_version != sent_keys:
                sent_keys = state.keys_version
                chunks.append(_sse("keys", state.key_names()))
            if state.shards_version != sent_shards:
                sent_shards = state.shards_version
                chunks.append(_sse("shards", state.shards_json()))
            ks = state.keys.get(key) if key is not None else None
            if key is not None and ks is not None and ks.version != sent_version:
                version = ks.version
                view = await self.live_view(key)
                history = ks.history_json(last_fit, last_tenor)
                last_fit, last_tenor = history["last_fit"], history["last_tenor"]
                chunks.append(
                    _sse(
                        "view",
                        {"view": view, "history": history, "reset": reset, "now_ms": self.clock()},
                    )
                )
                reset = False
                sent_version = version
            now = time.monotonic()
            if not chunks and now - last_write >= PING_S:
                chunks.append(b": ping\n\n")
            if chunks:
                await resp.write(b"".join(chunks))
                last_write = now
            await asyncio.sleep(self.push_interval_s)


async def follow(state: WebState, url: str, *, subscribe: Any = None) -> None:
    """Fill ``state`` from the broker at ``url`` (``{prefix}/#``, reconnecting by itself);
    raises ``SubscribeError`` when the broker refuses us."""
    if subscribe is None:
        from streamer.client.subscribe import subscribe_payloads as subscribe
    topic = f"{state.prefix}/#"
    async with contextlib.aclosing(subscribe(url, topic)) as messages:
        async for msg_topic, payload in messages:
            state.ingest(msg_topic, payload, _now_ms())


async def serve(app: WebApp, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``app`` on ``host:port`` (0: a free port): the runner (``await
    runner.cleanup()`` to stop) and the port bound."""
    runner = web.AppRunner(
        app.application(), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    log.info("web_listening", url=f"http://{_host_for_url(host)}:{bound}/", mode=app.mode)
    return runner, bound


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def page_url(host: str, port: int) -> str:
    return f"http://{_host_for_url(host)}:{port}/"


__all__ = [
    "DEFAULT_LISTEN",
    "ViewInputs",
    "WebApp",
    "follow",
    "page_url",
    "parse_listen",
    "plotly_js",
    "serve",
]
