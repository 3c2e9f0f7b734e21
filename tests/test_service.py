"""The daemon end to end: fake Deribit -> service -> real mosquitto -> subscriber.

Everything really runs: the fake Deribit websocket server on a loopback port speaks JSON-RPC,
mosquitto is started by the fixture on a free port, subscribers are plain aiomqtt clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import numpy as np
import pytest

from streamer.client.subscribe import subscribe
from streamer.client.surface import Surface
from streamer.config import load_config
from streamer.daemon import sdnotify
from streamer.daemon.metrics import Registry, serve
from streamer.daemon.service import Service
from streamer.feeds.deribit.fake import FakeDeribitServer, ScriptFrame
from streamer.publish.memory import MemoryPublisher
from streamer.publish.payloads import load_schema
from tests.conftest import UNIT
from tests.mosquitto import Mosquitto
from tests.synth import deribit_chain, make_chain, svi_surface, ticker_frame

FUTURE_MS = 1_893_484_800_000  # 2030-01-01 08:00 UTC: expiries stay live for the fake server


def chain_script(rounds: int = 3) -> tuple[list[dict[str, Any]], list[ScriptFrame]]:
    """A full synthetic BTC chain (8 expiries x 21 strikes x C/P) re-quoted ``rounds`` times."""
    _, fn = svi_surface()
    rng = np.random.default_rng(3)
    script: list[ScriptFrame] = []
    instruments: list[dict[str, Any]] = []
    for r in range(rounds):
        snap = make_chain(fn, noise_iv=0.002, rng=rng, ts_ms=FUTURE_MS + r * 1000)
        instruments, tickers = deribit_chain(snap)
        script += [ScriptFrame(f"ticker.{t['instrument_name']}", t) for t in tickers]
    return instruments, script


async def collect(url: str, topic: str, until: Any, timeout: float) -> dict[str, dict[str, Any]]:
    """Latest payload per topic from a plain aiomqtt subscriber until ``until(latest)``."""
    host, port = url.removeprefix("mqtt://").split(":")
    latest: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client(host, int(port)) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for msg in client.messages:
                raw = msg.payload
                assert isinstance(raw, bytes | bytearray)
                latest[msg.topic.value] = (
                    json.loads(raw) if raw[:1] == b"{" else {"raw": raw.decode()}
                )
                if until(latest):
                    return latest
    return latest


def service_config(fake_url: str, broker_url: str, **feed: Any) -> Any:
    cfg = load_config(None)
    return dataclasses.replace(
        cfg,
        instance="test-shard",
        # two models with closed forms written out below (the defaults are spline and SVI)
        models=dataclasses.replace(cfg.models, names=("svi", "ssvi")),
        feed=dataclasses.replace(cfg.feed, url=fake_url, currencies=("BTC",), **feed),
        publish=dataclasses.replace(cfg.publish, urls=(broker_url + "/streamer",)),
        trigger=dataclasses.replace(
            cfg.trigger, min_changed_quotes=100, min_interval_s=0.05, warmup_s=0.05
        ),
    )


def svi_iv(p: dict[str, float], k: np.ndarray, T: float) -> np.ndarray:
    """Raw SVI (Gatheral 2004) written out here, independent of streamer.models.svi."""
    w = p["a"] + p["b"] * (p["rho"] * (k - p["m"]) + np.sqrt((k - p["m"]) ** 2 + p["sigma"] ** 2))
    return np.asarray(np.sqrt(w / T))


def ssvi_iv(params: dict[str, float], theta: float, k: np.ndarray, T: float) -> np.ndarray:
    """SSVI (Gatheral-Jacquier 2014) with the power-law phi, written out here."""
    rho, eta, gamma = params["rho"], params["eta"], params["gamma"]
    phi = eta / (theta**gamma * (1.0 + theta) ** (1.0 - gamma))
    z = phi * k + rho
    w = 0.5 * theta * (1.0 + rho * phi * k + np.sqrt(z * z + 1.0 - rho * rho))
    return np.asarray(np.sqrt(w / T))


def check_greeks_independently(g: dict[str, Any], surf: dict[str, Any] | None, model: str) -> None:
    """Published prices and Greeks against QuantLib's Black formula at the published IV and,
    for fitted expiries, the published IV against the model's closed form at the published
    parameters (both written independently of the code that made them)."""
    import QuantLib as ql

    F, T = g["forward"], g["T"]
    for r in g["instruments"]:
        K, iv = r["strike"], r["iv"]
        kind = ql.Option.Call if r["type"] == "C" else ql.Option.Put
        calc = ql.BlackCalculator(ql.PlainVanillaPayoff(kind, K), F, iv * np.sqrt(T), 1.0)
        assert np.isclose(r["price_usd"], calc.value(), rtol=1e-9, atol=1e-9)
        assert np.isclose(r["price_coin"], calc.value() / F, rtol=1e-9, atol=1e-12)
        assert np.isclose(r["delta"], calc.deltaForward(), rtol=1e-9, atol=1e-12)
        assert np.isclose(r["gamma"], calc.gammaForward(), rtol=1e-7, atol=1e-15)
        assert np.isclose(r["vega"], calc.vega(T) / 100.0, rtol=1e-9, atol=1e-9)
    if surf is None:
        return
    entry = next(e for e in surf["expiries"] if e["expiry"] == g["expiry"])
    K = np.array([r["strike"] for r in g["instruments"]])
    k = np.log(K / entry["forward"])
    if model == "svi":
        want = svi_iv(entry["params"], k, entry["T"])
    else:
        want = ssvi_iv(surf["params"], entry["params"]["theta"], k, entry["T"])
    got = np.array([r["iv"] for r in g["instruments"]])
    np.testing.assert_allclose(got, want, rtol=1e-10)


def check_calendar(greeks: dict[str, dict[str, Any]], seq: int) -> None:
    """Across every published expiry (fitted or interpolated) of one surface: total variance
    at fixed log-moneyness does not fall with T (no calendar arbitrage in what bots read)."""
    same = sorted((g for g in greeks.values() if g["seq"] == seq), key=lambda g: g["T"])
    grid = np.linspace(-0.3, 0.3, 13)
    prev = None
    for g in same:
        k = np.log(np.array([r["strike"] for r in g["instruments"]]) / g["forward"])
        w = np.array([r["iv"] for r in g["instruments"]]) ** 2 * g["T"]
        calls = np.array([r["type"] == "C" for r in g["instruments"]])
        order = np.argsort(k[calls])
        inside = (grid >= k[calls].min()) & (grid <= k[calls].max())
        wk = np.interp(grid, k[calls][order], w[calls][order])
        if prev is not None:
            both = inside & prev[1]
            assert np.all(wk[both] >= prev[0][both] - 1e-9), g["expiry"]
        prev = (wk, inside)


def has_surfaces(latest: dict[str, dict[str, Any]], listed: set[str]) -> bool:
    """Both models published, and every listed expiry's greeks of that surface arrived."""
    for m in ("svi", "ssvi"):
        surf = latest.get(f"streamer/deribit/BTC/{m}/surface")
        if surf is None or surf.get("seq", 0) < 1:
            return False
        for e in listed:
            g = latest.get(f"streamer/deribit/BTC/{m}/greeks/{e}")
            if g is None or g["seq"] < surf["seq"]:
                return False
    return True


async def test_service_to_mosquitto_end_to_end(mosquitto: Mosquitto) -> None:
    instruments, script = chain_script()
    async with FakeDeribitServer(instruments=instruments, script=script, interval_s=0.0) as fake:
        service = Service(service_config(fake.url, mosquitto.url))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop, signals=False))
        listed = {i["instrument_name"].split("-")[1] for i in instruments}
        latest = await collect(
            mosquitto.url, "streamer/#", lambda d: has_surfaces(d, listed), 30 * UNIT
        )
        assert has_surfaces(latest, listed)
        status = latest["streamer/status/test-shard"]
        assert status["state"] == "online" and status["feeds"]["deribit"] in (
            "connected",
            "disconnected",
        )
        jsonschema.validate(status, load_schema("status"))
        surface_schema, greeks_schema = load_schema("surface"), load_schema("greeks")
        for model in ("svi", "ssvi"):
            surf = latest[f"streamer/deribit/BTC/{model}/surface"]
            jsonschema.validate(surf, surface_schema)
            assert surf["status"] == "ok"
            assert surf["fit"]["in_band"] > (0.9 if model == "svi" else 0.2)  # SSVI: misspecified
            fitted = {e["expiry"] for e in surf["expiries"]}
            prefix = f"streamer/deribit/BTC/{model}/greeks/"
            greeks = {t.removeprefix(prefix): p for t, p in latest.items() if t.startswith(prefix)}
            # every listed expiry has greeks, fitted or not, and says which it is
            assert set(greeks) == listed and fitted <= listed
            rebuilt = Surface.from_payload(surf)
            for expiry, g in greeks.items():
                jsonschema.validate(g, greeks_schema)
                assert g["fitted"] == (expiry in fitted) and g["status"] == "ok"
                assert all(r["iv"] is not None and r["iv"] > 0 for r in g["instruments"])
                if g["seq"] != surf["seq"]:
                    continue  # a newer surface arrived in between; compare matching pairs
                check_greeks_independently(g, surf if expiry in fitted else None, model)
                if expiry in fitted:  # what a bot rebuilds is what was published
                    rows = g["instruments"]
                    K = np.array([r["strike"] for r in rows])
                    calls = np.array([r["type"] == "C" for r in rows])
                    mine = rebuilt.greeks(K, expiry, calls)
                    for col in ("iv", "price_coin", "delta", "gamma", "vega", "theta"):
                        got = np.array([r[col] for r in rows], dtype=float)
                        assert np.allclose(got, mine[col], rtol=1e-12, atol=1e-15), col
            check_calendar(greeks, surf["seq"])
        stop.set()
        assert await asyncio.wait_for(task, 5 * UNIT) == 0
        after = await collect(
            mosquitto.url,
            "streamer/status/test-shard",
            lambda d: d.get("streamer/status/test-shard", {}).get("state") == "offline",
            5 * UNIT,
        )
        # the clean shutdown's own offline, not the last will (which also says offline)
        assert after["streamer/status/test-shard"]["state"] == "offline"
        assert after["streamer/status/test-shard"]["reason"] == "shutdown"
    assert service.latencies_ms  # tick-to-publish was measured (its size: streamer bench latency)


async def test_client_subscribe_yields_surfaces(mosquitto: Mosquitto) -> None:
    instruments, script = chain_script(rounds=2)
    async with FakeDeribitServer(instruments=instruments, script=script) as fake:
        service = Service(service_config(fake.url, mosquitto.url))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop, signals=False))
        got: list[Surface] = []
        async with asyncio.timeout(30 * UNIT):
            async for surface in subscribe(mosquitto.url, "deribit", "BTC", "svi"):
                got.append(surface)
                if len(surface.expiries) == 8:  # early fits see part of the chain
                    break
        stop.set()
        await asyncio.wait_for(task, 5 * UNIT)
    s = got[-1]
    assert s.model.name == "svi" and [g.seq for g in got] == sorted(g.seq for g in got)
    e = s.expiries[3]
    j = s.expiries.index(e)
    assert 0.3 < s.atm_iv(e) < 1.0
    assert s.iv(s.forward[j], e)[0] == pytest.approx(s.atm_iv(e))


async def test_memory_publisher_and_feed_disconnect_marks_stale() -> None:
    instruments, script = chain_script(rounds=2)
    # paced (2 ms a frame): the first fit is out before the connection drops
    async with FakeDeribitServer(
        instruments=instruments,
        script=script,
        drop_after_frames=len(script) - 1,
        interval_s=0.002 * UNIT,
    ) as fake:
        mem = MemoryPublisher()
        cfg = service_config(fake.url, "mqtt://127.0.0.1:1")
        service = Service(cfg, publishers=[mem])
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop, signals=False))
        topic = "streamer/deribit/BTC/svi/surface"
        async with asyncio.timeout(30 * UNIT):
            while not any(
                m.topic == topic and m.payload.get("status") == "stale" for m in mem.messages
            ):
                await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5 * UNIT)
    statuses = [m.payload["status"] for m in mem.messages if m.topic == topic]
    assert statuses[0] == "ok" and "stale" in statuses


def _write_config(tmp: Path, fake_url: str, broker_url: str, port: int = 0) -> Path:
    path = tmp / "shard.toml"
    path.write_text(
        f"""
instance = "sig-shard"
[feed]
url = "{fake_url}"
currencies = ["BTC"]
[models]
names = ["svi"]
[trigger]
min_changed_quotes = 100
min_interval_s = 0.05
[publish]
urls = ["{broker_url}/streamer"]
[metrics]
port = {port}
[log]
format = "json"
"""
    )
    return path


async def _run_daemon(config: Path, env: dict[str, str] | None = None) -> Any:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamer",
        "run",
        "--config",
        str(config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def _online(d: dict[str, dict[str, Any]]) -> bool:
    return d.get("streamer/status/sig-shard", {}).get("state") == "online" and (
        "streamer/deribit/BTC/svi/surface" in d
    )


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_daemon_process_signals(mosquitto: Mosquitto, tmp_path: Path, how: str) -> None:
    """SIGTERM: offline published, exit 0 within 5 s. SIGKILL: the broker's last will."""
    instruments, script = chain_script()
    async with FakeDeribitServer(instruments=instruments, script=script, loops=None) as fake:
        proc = await _run_daemon(_write_config(tmp_path, fake.url, mosquitto.url))
        try:
            seen = await collect(mosquitto.url, "streamer/#", _online, 60 * UNIT)
            assert _online(seen)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
            rc = await asyncio.wait_for(proc.wait(), 10 * UNIT)
            took = time.monotonic() - t0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        status = await collect(
            mosquitto.url,
            "streamer/status/sig-shard",
            lambda d: d.get("streamer/status/sig-shard", {}).get("state") == "offline",
            10 * UNIT,
        )
        offline = status["streamer/status/sig-shard"]
        assert offline["state"] == "offline"
    if how == "sigterm":  # the daemon's own goodbye, not the broker's last will
        assert rc == 0 and took < 5.0 * UNIT and offline["reason"] == "shutdown"
    else:  # the last will, sent by the broker for the dead connection
        assert rc == -signal.SIGKILL and offline["reason"] == "connection lost"


def test_cli_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[models]\nnames = ["svi", "nope"]\n')
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(bad)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
    )
    assert out.returncode == 2
    assert "models.names[1]" in out.stderr and "svi" in out.stderr
    typo = tmp_path / "typo.toml"
    typo.write_text("[trigger]\nmin_changed_quote = 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(typo)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
    )
    assert out.returncode == 2 and "min_changed_quote" in out.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(tmp_path / "none.toml")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
    )
    assert missing.returncode == 2 and "not found" in missing.stderr


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    reg = Registry()
    reg.frames.inc(3)
    reg.drops.inc(2, stage="parse", reason="bad_json")
    reg.fit_seconds.observe(0.0015, model="svi")
    reg.fit_seconds.observe(0.3, model="svi")
    server = await serve(reg, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert body.startswith("HTTP/1.0 200 OK")
    assert "streamer_frames_total 3" in body
    assert 'streamer_drops_total{reason="bad_json",stage="parse"} 2' in body
    assert 'streamer_fit_seconds_bucket{model="svi",le="0.002"} 1' in body
    assert 'streamer_fit_seconds_bucket{model="svi",le="+Inf"} 2' in body
    assert 'streamer_fit_seconds_count{model="svi"} 2' in body


def test_sd_notify_sends_datagrams(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(2)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1"
    assert not sdnotify.notify("READY=1", {})
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_interval_s(env) == 15.0
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}) is None


def test_systemd_units_verify(tmp_path: Path) -> None:
    import shutil

    analyze, exe = shutil.which("systemd-analyze"), shutil.which("streamer")
    units = Path(__file__).resolve().parent.parent / "systemd"
    for name in ("streamer.service", "streamer@.service"):
        text = (units / name).read_text()
        for directive in (
            "Type=notify",
            "WatchdogSec=",
            "Restart=on-failure",
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "CacheDirectory=streamer",  # numba's kernel cache: home and install are read-only
            "NUMBA_CACHE_DIR=%C/streamer/numba",
        ):
            assert directive in text, (name, directive)
        if analyze is None or exe is None:
            continue
        local = tmp_path / name.replace("@.", "@x.")
        local.write_text(text.replace("/opt/streamer/venv/bin/streamer", exe))
        out = subprocess.run(
            [analyze, "verify", str(local)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60 * UNIT,
        )
        assert out.returncode == 0, out.stderr


async def test_replay_to_mosquitto_matches_jsonl(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """`streamer replay --publish mqtt://... --out X`: the broker's retained state equals the
    last message per topic in the JSON lines, and everything validates."""
    _, fn = svi_surface()
    rng = np.random.default_rng(9)
    rec = tmp_path / "rec.jsonl"
    with rec.open("w") as fh:
        for r in range(3):
            snap = make_chain(fn, noise_iv=0.002, rng=rng, ts_ms=FUTURE_MS + r * 1000)
            for t in deribit_chain(snap)[1]:
                ts_ns = int(t["timestamp"]) * 1_000_000  # type: ignore[call-overload]
                fh.write(json.dumps({"ts_ns": ts_ns, "venue": "deribit", "frame": ticker_frame(t)}))
                fh.write("\n")
    out = tmp_path / "out.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "replay", str(rec), "--model", "svi", "--model",
        "sabr", "--publish", mosquitto.url, "--out", str(out),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 120 * UNIT)
    assert proc.returncode == 0, err.decode()
    assert b"| svi |" in err and b"| sabr |" in err  # the summary table
    last: dict[str, dict[str, Any]] = {}
    for line in out.read_text().splitlines():
        rec_ = json.loads(line)
        last[rec_["topic"]] = rec_["payload"]
    assert any(t.endswith("/sabr/surface") for t in last)
    retained = await collect(
        mosquitto.url,
        "streamer/deribit/#",
        lambda d: set(last) <= set(d),
        20 * UNIT,
    )
    for topic, payload in last.items():
        assert retained[topic] == payload, topic
        tenors = topic.endswith("/tenors")
        schema = load_schema(
            "surface" if topic.endswith("/surface") else "tenors" if tenors else "greeks"
        )
        jsonschema.validate(payload, schema)


async def test_record_only_writes_every_received_frame(tmp_path: Path) -> None:
    """`streamer record`'s service mode: no models, no publishers, raw frames to .jsonl.zst."""
    from streamer.feeds.recordings.reader import read_recording

    instruments, script = chain_script(rounds=1)
    async with FakeDeribitServer(instruments=instruments, script=script) as fake:
        cfg = service_config(fake.url, "mqtt://127.0.0.1:1")
        cfg = dataclasses.replace(
            cfg,
            recorder=dataclasses.replace(cfg.recorder, dir=str(tmp_path)),
            publish=dataclasses.replace(cfg.publish, urls=()),
        )
        service = Service(cfg, record_only=True)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop, signals=False))
        # the script (one pass) has gone out and the parser has seen every frame the server
        # sent (replies too: the script's count alone may be reached while the last tickers
        # are still on the way)
        async with asyncio.timeout(20 * UNIT):
            while not (
                fake.connections
                and fake.connections[-1].script_done
                and service.pipeline.parser.frames >= len(fake.connections[-1].sent)
            ):
                await asyncio.sleep(0.05)
        stop.set()
        assert await asyncio.wait_for(task, 5 * UNIT) == 0
    files = sorted(tmp_path.glob("deribit-*.jsonl.zst"))
    assert files
    frames = [f for path in files for _, _, f in read_recording(path)]
    assert len(frames) == service.pipeline.parser.frames  # every frame the parser saw
    tickers = [f for f in frames if '"channel":"ticker.' in f.replace(" ", "")]
    assert len(tickers) == len(script)
    assert not service.pipeline.fits  # record only: nothing fitted


async def test_replay_feed_drives_the_service(tmp_path: Path) -> None:
    """The replay plug point: a recording through the live service, paced at a frame rate."""
    from streamer.feeds.recordings.replay_feed import ReplayFeed

    _, fn = svi_surface()
    snap = make_chain(fn, noise_iv=0.002, rng=np.random.default_rng(4), ts_ms=FUTURE_MS)
    rec = tmp_path / "rec.jsonl"
    tickers = deribit_chain(snap)[1]
    with rec.open("w") as fh:
        for t in tickers:
            line = {"ts_ns": FUTURE_MS * 1_000_000, "venue": "deribit", "frame": ticker_frame(t)}
            fh.write(json.dumps(line) + "\n")
    feeds: list[ReplayFeed] = []

    def factory(config: Any, parser: Any, on_frame: Any) -> ReplayFeed:
        feeds.append(ReplayFeed([str(rec)], parser=parser, rate=2000.0, on_frame=on_frame))
        return feeds[0]

    mem = MemoryPublisher()
    service = Service(service_config("ws://127.0.0.1:1", "mqtt://127.0.0.1:1"),
                      feed_factory=factory, publishers=[mem])  # fmt: skip
    t0 = time.monotonic()
    assert await asyncio.wait_for(service.run(signals=False), 20 * UNIT) == 0  # ends with feed
    took = time.monotonic() - t0
    assert feeds[0].frames == len(tickers) and took >= len(tickers) / 2000.0
    surfaces = [m.payload for m in mem.messages if m.topic.endswith("/svi/surface")]
    assert surfaces and surfaces[-1]["status"] == "stale"  # the feed ended: re-stamped
    assert any(p["status"] == "ok" and p["fit"]["in_band"] > 0.9 for p in surfaces)


class _BrokenFeed:
    """A feed whose stream fails after its first event (a bug, or a fatal venue error);
    without an error, a feed that goes quiet forever."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.closed = False

    async def events(self) -> Any:
        from streamer.events import FeedStatus

        yield FeedStatus("deribit", "connected", time.time_ns())
        await asyncio.sleep(0.01)
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


async def test_a_failed_task_ends_the_service_with_a_non_zero_exit() -> None:
    """An exception in the feed task ends the TaskGroup: the service publishes its surfaces'
    last state, closes the publishers, logs the cause, and returns EXIT_FAILURE (so systemd's
    Restart=on-failure restarts it); every task it started is done."""
    import structlog

    from streamer.daemon.service import EXIT_FAILURE

    feed = _BrokenFeed(RuntimeError("venue said no"))
    mem = MemoryPublisher()
    service = Service(
        service_config("ws://127.0.0.1:1", "mqtt://127.0.0.1:1"),
        feed_factory=lambda *a: feed,  # type: ignore[arg-type]
        publishers=[mem],
    )
    before = asyncio.all_tasks()
    with structlog.testing.capture_logs() as logs:
        code = await asyncio.wait_for(service.run(signals=False), 30 * UNIT)
    assert code == EXIT_FAILURE and feed.closed
    failed = [e for e in logs if e["event"] == "service_failed"]
    assert failed and "venue said no" in failed[0]["error"]
    assert asyncio.all_tasks() <= before | {asyncio.current_task()}


async def test_a_failed_ticker_ends_the_service_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamer.daemon.service import EXIT_FAILURE

    mem = MemoryPublisher()
    service = Service(
        service_config("ws://127.0.0.1:1", "mqtt://127.0.0.1:1"),
        feed_factory=lambda *a: _BrokenFeed(None),  # type: ignore[arg-type]
        publishers=[mem],
    )

    def broken() -> None:
        raise ValueError("metrics bug")

    monkeypatch.setattr(service, "_refresh_metrics", broken)
    stop = asyncio.Event()
    code = await asyncio.wait_for(service.run(stop, signals=False), 30 * UNIT)
    assert code == EXIT_FAILURE
