"""``streamer web``: the live page, from its pure state to a real browser.

Layers: the state and the view against closed forms and hand counts (the SVI curve from its
formula, the quality measure, out-of-the-money points, bounded histories, cleared and
lagging expiries, shard health); the timeline of a real replay's output against the file
read independently; the HTTP API, the SSE stream and the page inside the daemon (the
publisher) over real sockets; then headless Chromium (Debian's ``chromium`` driven by
Playwright) against a real mosquitto fed by a ``streamer replay`` of the bundled recording:
every expiry's smile drawn, a new surface arriving without a reload, the shard going
``offline`` when its process is killed, and no console error; and the file mode's time slider.
Browser tests skip with the reason where chromium or Playwright is missing
(``scripts/install`` installs both). ``STREAMER_WEB_SCREENSHOT=docs/web-live.png`` saves the
live page's screenshot there (how the README's picture is made).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.feeds.recordings.reader import read_frames
from streamer.instruments import parse_option
from streamer.publish.payloads import greeks_payload, greeks_row, surface_payload
from streamer.tools.web.publisher import WebPublisher
from streamer.tools.web.server import WebApp, parse_listen, plotly_js, serve
from streamer.tools.web.state import (
    CURVE_POINTS,
    WebState,
    build_view,
    otm_points,
    quality,
    shard_health,
)
from streamer.tools.web.timeline import Timeline
from tests.conftest import REPO, UNIT
from tests.mosquitto import Mosquitto
from tests.test_fake_deribit_cmd import cut_recording

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ENV = {
    **os.environ,
    "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(REPO / ".numba_cache")),
    "PYTHONUNBUFFERED": "1",
}
KEY = ("deribit", "BTC", "svi")
SVI = {"a": 0.002, "b": 0.01, "rho": -0.3, "m": 0.01, "sigma": 0.05}
T1 = 30 / 365
F1 = 90_000.0


def svi_iv(K: np.ndarray, F: float, T: float, p: dict[str, float]) -> np.ndarray:
    """Raw SVI (Gatheral 2004): w(k) = a + b (rho (k - m) + sqrt((k - m)^2 + sigma^2))."""
    k = np.log(K / F)
    w = p["a"] + p["b"] * (p["rho"] * (k - p["m"]) + np.sqrt((k - p["m"]) ** 2 + p["sigma"] ** 2))
    return np.asarray(np.sqrt(w / T))


def a_surface(seq: int = 1, ts_ms: int = 1_772_442_000_000, status: str = "ok") -> dict[str, Any]:
    expiry_ms = ts_ms + int(T1 * 365 * 86_400_000)
    atm = float(svi_iv(np.array([F1]), F1, T1, SVI)[0])
    return dict(
        surface_payload(
            venue="deribit",
            underlying="BTC",
            model="svi",
            ts_ms=ts_ms,
            seq=seq,
            status=status,  # type: ignore[arg-type]
            fit=dict(
                rmse_iv=0.003,
                in_band=0.95,
                n_quotes=40,
                nfev=3,
                elapsed_ms=0.8,
                warm=seq > 1,
                regime_shift=False,
                penalty=0.01,
            ),
            params={},
            expiries=[
                dict(
                    expiry="1APR26",
                    expiry_ms=expiry_ms,
                    T=T1,
                    forward=F1,
                    atm_iv=atm,
                    params=SVI,
                    rmse_iv=0.003,
                    in_band=0.95,
                    n_quotes=40,
                )
            ],
        )
    )


def row(strike: float, typ: str, iv: float | None, bid: float | None, ask: float | None,
        mark: float | None = None) -> dict[str, Any]:  # fmt: skip
    return dict(
        greeks_row(
            instrument=f"BTC-1APR26-{int(strike)}-{typ}",
            strike=strike,
            type=typ,  # type: ignore[arg-type]
            iv=iv,
            price_coin=None,
            price_usd=None,
            delta=None,
            delta_premium_adj=None,
            gamma=None,
            vega=None,
            theta=None,
            vanna=None,
            volga=None,
            bid_iv=bid,
            ask_iv=ask,
            mark_iv=mark,
        )
    )


def a_greeks(rows: list[dict[str, Any]], seq: int = 1, T: float = T1) -> dict[str, Any]:
    return dict(
        greeks_payload(
            ts_ms=1_772_442_000_000, seq=seq, expiry="1APR26", forward=F1, T=T, instruments=rows
        )
    )


# -- the state and the view ----------------------------------------------------------------


def test_the_fitted_curve_is_the_svi_formula() -> None:
    state = WebState("streamer")
    state.ingest("streamer/deribit/BTC/svi/surface", a_surface(), 1)
    rows = [row(k, "C" if k >= F1 else "P", 0.5, 0.49, 0.51, 0.5) for k in (80e3, 90e3, 100e3)]
    state.ingest("streamer/deribit/BTC/svi/greeks/1APR26", a_greeks(rows), 2)
    inputs = state.inputs(KEY)
    assert inputs is not None
    view = build_view(inputs)
    (e,) = view["expiries"]
    K = np.array(e["curve"]["strike"])
    assert len(K) == CURVE_POINTS
    assert K.min() < 80e3 and K.max() > 100e3  # a little beyond the listed strikes
    np.testing.assert_allclose(e["curve"]["iv"], svi_iv(K, F1, T1, SVI), rtol=1e-10)
    assert e["fitted"] and e["in_surface"] and e["status"] == "ok"
    assert view["term"]["expiry"] == ["1APR26"]
    assert math.isclose(view["term"]["days"][0], 30.0)


def test_quality_counts_as_the_guide_says() -> None:
    rows = [
        row(80e3, "P", 0.50, 0.49, 0.51, 0.52),  # OTM put, model in, mark out
        row(80e3, "C", 0.50, 0.40, 0.41, 0.405),  # ITM call: not counted
        row(85e3, "P", None, 0.49, 0.51, 0.50),  # a null iv is a miss; mark in
        row(95e3, "C", 0.50, None, 0.51, 0.50),  # one-sided: not counted
        row(100e3, "C", 0.52, 0.49, 0.51, 0.50),  # model out, mark in
        row(105e3, "C", 0.50, 0.51, 0.51, 0.51),  # ask not above bid: not counted
    ]
    assert quality(rows, F1, T1) == {"n": 3, "model": 1, "mark": 2}
    assert quality(rows, F1, 1.0 / (365 * 24)) == {"n": 0, "model": 0, "mark": 0}  # T < 2 h


def test_one_point_per_strike_out_of_the_money() -> None:
    rows = [
        row(80e3, "C", 0.6, 0.5, 0.7),
        row(80e3, "P", 0.5, 0.49, 0.51),
        row(100e3, "P", 0.6, 0.5, 0.7),
        row(100e3, "C", 0.45, 0.44, 0.46),
        row(110e3, "P", 0.6, 0.5, 0.7),  # only the ITM side listed: shown
    ]
    pts = otm_points(rows, F1)
    assert pts["strike"] == [80e3, 100e3, 110e3]
    assert pts["type"] == ["P", "C", "P"]
    assert pts["mid"][0] == pytest.approx(0.5)
    assert pts["bid"][1] == 0.44 and pts["ask"][1] == 0.46


def test_history_is_a_bounded_ring() -> None:
    state = WebState("streamer", history=5)
    for seq in range(1, 13):
        state.ingest(
            "streamer/deribit/BTC/svi/surface", a_surface(seq, 1_772_442_000_000 + seq), seq
        )
    ks = state.keys[KEY]
    assert [r.n for r in ks.fits] == [8, 9, 10, 11, 12]
    h = ks.history_json(since_fit=10)
    assert [r["seq"] for r in h["fits"]] == [11, 12]
    assert h["fits"][0]["params"]["1APR26"] == pytest.approx(SVI)
    assert h["fits"][0]["rmse_iv"] == 0.003 and h["fits"][0]["warm"] is True


def test_cleared_and_lagging_expiries_leave_the_view() -> None:
    state = WebState("streamer")
    g = a_greeks([row(90e3, "C", 0.5, 0.49, 0.51)], seq=900)  # retained by an earlier run
    state.ingest("streamer/deribit/BTC/svi/greeks/9APR26", {**g, "expiry": "9APR26"}, 0)
    state.ingest("streamer/deribit/BTC/svi/surface", a_surface(1), 1)  # a restarted daemon
    g = a_greeks([row(90e3, "C", 0.5, 0.49, 0.51)], seq=1)
    state.ingest("streamer/deribit/BTC/svi/greeks/1APR26", g, 1)
    state.ingest("streamer/deribit/BTC/svi/greeks/2APR26", {**g, "expiry": "2APR26"}, 1)
    live = state.keys[KEY].live_greeks
    assert set(live()) == {"1APR26", "2APR26", "9APR26"}  # its seq is no reason to drop it
    state.ingest("streamer/deribit/BTC/svi/greeks/2APR26", None, 2)  # cleared
    assert set(live()) == {"1APR26", "9APR26"}
    state.ingest("streamer/deribit/BTC/svi/surface", a_surface(2), 2)
    state.ingest("streamer/deribit/BTC/svi/greeks/1APR26", {**g, "seq": 2}, 2)
    assert set(live()) == {"1APR26", "9APR26"}  # 9APR26 missed surfaces 1 and 2 only
    state.ingest("streamer/deribit/BTC/svi/surface", a_surface(3), 3)
    assert set(live()) == {"1APR26"}  # 9APR26 missed 1, 2 and 3; 1APR26 not yet 3
    state.ingest("streamer/deribit/BTC/svi/greeks/1APR26", {**g, "seq": 3, "T": 0.0}, 3)
    assert live() == {}  # at expiry


def test_bad_payloads_are_counted_not_fatal() -> None:
    state = WebState("streamer")
    assert not state.ingest("streamer/deribit/BTC/svi/surface", {"model": "svi"}, 1)
    assert not state.ingest("streamer/deribit/BTC/svi/greeks/1APR26", {"seq": 1}, 1)
    assert not state.ingest("streamer/status/x", {"state": "sleeping"}, 1)
    assert state.dropped["malformed"] == 3
    assert not state.ingest("other/deribit/BTC/svi/surface", a_surface(), 1)  # not our prefix
    assert not state.ingest("streamer/deribit/BTC/svi/what", a_surface(), 1)
    assert state.ingest("streamer/deribit/BTC/svi/surface", a_surface(), 1)


def test_shard_health() -> None:
    assert shard_health({"state": "offline", "feeds": {}}) == "offline"
    assert shard_health({"state": "online", "feeds": {"deribit": "connected"}}) == "online"
    assert shard_health({"state": "online", "feeds": {"deribit": "disconnected"}}) == "stale"
    assert shard_health({"state": "online", "feeds": {"d": {"state": "connecting"}}}) == "stale"


def test_listen_is_loopback_unless_allowed() -> None:
    assert parse_listen("127.0.0.1:8808") == ("127.0.0.1", 8808)
    assert parse_listen("[::1]:0") == ("::1", 0)
    with pytest.raises(ConfigError, match="not a loopback"):
        parse_listen("0.0.0.0:8808")
    assert parse_listen("0.0.0.0:8808", allow_remote=True) == ("0.0.0.0", 8808)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen("8808")


def test_web_config_section() -> None:
    from streamer.config import config_from_table

    assert config_from_table({}).web.listen == ""  # off by default
    assert config_from_table({"web": {"listen": "127.0.0.1:8808"}}).web.listen
    with pytest.raises(ConfigError, match="loopback"):
        config_from_table({"web": {"listen": "0.0.0.0:8808"}})
    cfg = config_from_table({"web": {"listen": "0.0.0.0:8808", "allow_remote": True}})
    assert cfg.web.allow_remote


# -- a real replay's output -----------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``streamer replay`` of the bundled recording's first 40 s, to a JSON Lines file."""
    tmp = tmp_path_factory.mktemp("web")
    rec = cut_recording(tmp / "calm-40s.jsonl", 40.0)
    out = tmp / "out.jsonl"
    config = tmp / "replay.toml"
    config.write_text(
        '[trigger]\nmax_interval_s = 5.0\nmin_interval_s = 2.0\n[log]\nlevel = "warning"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "streamer", "replay", str(rec), "--model", "svi", "--model", "ssvi",
         "--config", str(config), "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=300 * UNIT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_timeline_steps_are_the_files_surfaces(replay_out: Path) -> None:
    lines = [json.loads(x) for x in replay_out.read_text().splitlines()]
    surfaces = [m["payload"] for m in lines if m["topic"] == "streamer/deribit/BTC/svi/surface"]
    with Timeline(replay_out) as tl:
        assert set(tl.keys) == {KEY, ("deribit", "BTC", "ssvi")}
        assert tl.steps(KEY) == len(surfaces) >= 3
        for step in (0, len(surfaces) // 2, len(surfaces) - 1):
            inputs = tl.inputs(KEY, step)
            assert inputs is not None and inputs.surface == surfaces[step]
            seqs = {g["seq"] for g in inputs.greeks.values()}
            assert seqs == {surfaces[step]["seq"]}  # the greeks published with that surface
            listed = {e["expiry"] for e in surfaces[step]["expiries"]}
            assert listed <= set(inputs.greeks)
        assert [r.seq for r in tl.fits(KEY)] == [s["seq"] for s in surfaces]


def test_timeline_reads_compressed_files(replay_out: Path, tmp_path: Path) -> None:
    import zstandard

    packed = tmp_path / "out.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(replay_out.read_bytes()))
    with Timeline(replay_out) as plain, Timeline(packed) as tl:
        assert tl.steps(KEY) == plain.steps(KEY)
        last = tl.steps(KEY) - 1
        a, b = tl.inputs(KEY, last), plain.inputs(KEY, last)
        assert a is not None and b is not None and a.surface == b.surface
        temp = tl._plain
    assert not os.path.exists(temp)  # the decompressed copy is removed


# -- HTTP, SSE and the page inside the daemon ----------------------------------------------


@contextlib.asynccontextmanager
async def served(app: WebApp) -> AsyncIterator[str]:
    runner, port = await serve(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def test_http_api_and_the_page_assets() -> None:
    state = WebState("streamer")
    state.ingest("streamer/deribit/BTC/svi/surface", a_surface(), 1)
    async with served(WebApp.live(state, source="test")) as url, aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            html = await r.text()
        scripts = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', html)
        assert "/static/plotly.min.js" in scripts
        assert all(s.startswith(("/static/", "data:")) for s in scripts), scripts  # no CDN
        async with http.get(url + "static/plotly.min.js") as r:
            assert r.status == 200
            assert await r.read() == plotly_js().read_bytes()
        async with http.get(url + "static/app.js") as r:
            assert r.status == 200 and "EventSource" in await r.text()
        async with http.get(url + "static/../state.py") as r:
            assert r.status == 404
        async with http.get(url + "api/info") as r:
            info = await r.json()
        assert info["mode"] == "live" and info["keys"] == ["deribit/BTC/svi"]
        async with http.get(url + "api/view?key=deribit/BTC/svi") as r:
            view = (await r.json())["view"]
        assert view["surface"]["seq"] == 1
        async with http.get(url + "api/view?key=nope") as r:
            assert r.status == 400


async def test_sse_stream_sends_the_view_then_new_surfaces() -> None:
    state = WebState("streamer")
    state.ingest("streamer/deribit/BTC/svi/surface", a_surface(1), 1)
    app = WebApp.live(state, push_interval_s=0.05)
    async with (
        served(app) as url,
        aiohttp.ClientSession() as http,
        http.get(url + "api/events?key=deribit/BTC/svi") as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r)
        seen: dict[str, Any] = {}
        async with asyncio.timeout(10 * UNIT):
            while "view" not in seen:
                name, data = await anext(events)
                seen[name] = data
            assert seen["view"]["reset"] is True
            assert [f["seq"] for f in seen["view"]["history"]["fits"]] == [1]
            state.ingest("streamer/deribit/BTC/svi/surface", a_surface(2), 2)
            name, data = await anext(events)
            while name != "view":
                name, data = await anext(events)
        assert data["reset"] is False and data["view"]["surface"]["seq"] == 2
        assert [f["seq"] for f in data["history"]["fits"]] == [2]  # only what is new


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    name, data = "", ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif not line and name:
            yield name, json.loads(data)
            name, data = "", ""


async def test_the_daemons_own_page() -> None:
    pub = WebPublisher(listen="127.0.0.1:0", prefix="streamer", instance="shard-1")
    async with pub, aiohttp.ClientSession() as http:
        await pub.deliver("streamer/deribit/BTC/svi/surface", a_surface(7))
        pub.set_feed_state("deribit", "disconnected")
        async with http.get(pub.url + "api/view?key=deribit/BTC/svi") as r:
            assert (await r.json())["view"]["surface"]["seq"] == 7
        async with http.get(pub.url + "api/info") as r:
            (shard,) = (await r.json())["shards"]
        assert shard["instance"] == "shard-1" and shard["health"] == "stale"
        url = pub.url
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(url + "api/info"):
            pass
    with pytest.raises(ConfigError, match="loopback"):
        WebPublisher(listen="0.0.0.0:0")


def test_run_adds_the_page_only_when_configured() -> None:
    from streamer.cli import run
    from streamer.config import config_from_table

    assert run._web(config_from_table({})) == []
    (pub,) = run._web(config_from_table({"web": {"listen": "127.0.0.1:0"}, "instance": "x"}))
    assert isinstance(pub, WebPublisher) and pub.instance == "x"


# -- a real browser -------------------------------------------------------------------------


def _chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (scripts/install apt-installs chromium)")
    pytest.importorskip("playwright", reason="playwright not installed (pip install -e .[dev])")


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[tuple[Any, list[str]]]:
    """A fresh headless Chromium page and the console errors it logs."""
    from playwright.async_api import async_playwright

    errors: list[str] = []
    profile = tempfile.mkdtemp(prefix="streamer-chromium-")
    try:
        async with async_playwright() as pw:
            ctx = await pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1500, "height": 1000},
            )
            try:
                page = await ctx.new_page()
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
                yield page, errors
            finally:
                await ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


DRAWN_SMILES = """() => Array.from(document.querySelectorAll('#smiles .smile')).map((box) => {
  const gd = box.querySelector('.plot');
  const traces = (gd && gd.data) || [];
  const fit = traces.find((t) => t.mode === 'lines');
  const market = traces.find((t) => t.name === 'bid–ask (mid)');
  return {
    expiry: box.dataset.expiry,
    fit: fit ? fit.y.filter((v) => v !== null).length : 0,
    market: market ? market.x.length : 0,
    svg: gd ? gd.querySelectorAll('.main-svg').length : 0,
  };
})"""


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=REPO,
    )


@contextlib.contextmanager
def running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    proc.lines = lines  # type: ignore[attr-defined]
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
        thread.join(timeout=10 * UNIT)
        if proc.stdout is not None:
            proc.stdout.close()


async def wait_line(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    rx = re.compile(pattern)
    lines: list[str] = proc.lines  # type: ignore[attr-defined]
    async with asyncio.timeout(timeout):
        while True:
            for line in list(lines):
                if m := rx.search(line):
                    return m
            if proc.poll() is not None:
                raise AssertionError(f"exited before {pattern!r}: {''.join(lines)[-3000:]}")
            await asyncio.sleep(0.1)


def recorded_expiries(recording: Path) -> set[str]:
    """The expiries of the recording's own get_instruments reply (read independently)."""
    reply = json.loads(next(read_frames(recording))[2])
    return {
        opt.expiry
        for r in reply["result"]
        if (opt := parse_option(r["instrument_name"])) is not None
    }


@pytest.mark.slow
async def test_live_page_in_chromium(mosquitto: Mosquitto, tmp_path: Path) -> None:
    _chromium()
    rec = cut_recording(tmp_path / "calm-3m.jsonl", 180.0)
    expiries = recorded_expiries(rec)
    broker = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    config = tmp_path / "replay.toml"
    config.write_text(
        'instance = "replay-e2e"\n[trigger]\nmax_interval_s = 5.0\nmin_interval_s = 1.0\n'
        '[log]\nlevel = "warning"\n'
    )
    with running(_spawn("web", "--broker", broker, "--listen", "127.0.0.1:0")) as web:
        url = (await wait_line(web, r"serving (http://127\.0\.0\.1:\d+/)", 60 * UNIT))[1]
        replay = _spawn("replay", str(rec), "--model", "svi", "--speed", "2",
                        "--publish", broker, "--config", str(config))  # fmt: skip
        with running(replay):
            async with browser_page() as (page, errors):
                await page.goto(url + "#key=deribit%2FBTC%2Fsvi")
                await page.evaluate("() => { window.__sameDocument = true; }")
                # every expiry's smile drawn: its curve, its quotes (the greeks follow each
                # surface: wait for both), an SVG
                await page.wait_for_function(
                    f"() => ({DRAWN_SMILES})().filter("
                    "(s) => s.fit > 100 && s.market > 0 && s.svg > 0"
                    f").length >= {len(expiries)}",
                    timeout=90_000 * UNIT,
                )
                smiles = await page.evaluate(DRAWN_SMILES)
                assert {s["expiry"] for s in smiles} == expiries
                first = int(await page.get_attribute("#head", "data-seq") or 0)
                await page.wait_for_function(
                    f"() => Number(document.getElementById('head').dataset.seq) > {first}",
                    timeout=60_000 * UNIT,
                )
                assert await page.evaluate("() => window.__sameDocument === true")  # no reload
                assert (
                    await page.get_attribute('tr[data-instance="replay-e2e"]', "data-health")
                    == "online"
                )
                assert await page.evaluate("() => document.getElementById('diag').data.length") > 0
                shot = os.environ.get("STREAMER_WEB_SCREENSHOT")
                await page.screenshot(path=shot or str(tmp_path / "live.png"), full_page=True)
                replay.send_signal(signal.SIGKILL)  # the broker sends its last will
                replay.wait(timeout=10 * UNIT)
                await page.wait_for_selector(
                    'tr[data-instance="replay-e2e"][data-health="offline"]', timeout=30_000 * UNIT
                )
                assert errors == []


@pytest.mark.slow
async def test_file_page_in_chromium(replay_out: Path) -> None:
    _chromium()
    lines = [json.loads(x) for x in replay_out.read_text().splitlines()]
    surfaces = [m["payload"] for m in lines if m["topic"] == "streamer/deribit/BTC/svi/surface"]
    with running(_spawn("web", "--file", str(replay_out), "--listen", "127.0.0.1:0")) as web:
        url = (await wait_line(web, r"serving (http://127\.0\.0\.1:\d+/)", 60 * UNIT))[1]
        async with browser_page() as (page, errors):
            await page.goto(url + "#key=deribit%2FBTC%2Fsvi")
            await page.wait_for_selector("#timebar:not([hidden])", timeout=30_000 * UNIT)
            last = surfaces[-1]
            await page.wait_for_function(
                f"() => document.getElementById('head').dataset.seq === '{last['seq']}'",
                timeout=30_000 * UNIT,
            )
            smiles = await page.evaluate(DRAWN_SMILES)
            assert {s["expiry"] for s in smiles} == {e["expiry"] for e in last["expiries"]}
            assert all(s["fit"] > 100 and s["market"] > 0 and s["svg"] > 0 for s in smiles)
            slider = page.locator("#slider")
            assert await slider.get_attribute("max") == str(len(surfaces) - 1)
            await slider.fill("0")  # back to the first surface
            await page.wait_for_function(
                f"() => document.getElementById('head').dataset.seq === '{surfaces[0]['seq']}'",
                timeout=30_000 * UNIT,
            )
            n = await page.evaluate("() => document.getElementById('diag').data[0].x.length")
            assert n == 1  # the history as of the first surface
            assert errors == []


def test_command_refuses_a_password_on_the_command_line_and_remote_listen() -> None:
    secret = "s3cret-web"
    for args, wanted in (
        (["--broker", f"mqtt://bot:{secret}@127.0.0.1:1883"], "STREAMER_MQTT_PASSWORD"),
        (["--broker", "mqtt://127.0.0.1:1883", "--listen", "0.0.0.0:8808"], "loopback"),
        (["--file", "/nonexistent/out.jsonl"], "No such file"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "streamer", "web", *args],
            capture_output=True, text=True, env=ENV, timeout=60 * UNIT, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert wanted in done.stderr
        assert secret not in done.stdout + done.stderr
