"""Process faults, through the real ``streamer run`` process where a process is what matters.

* SIGTERM and SIGINT: exit 0 within 5 s (times the test unit), the status topic's own
  ``offline`` with reason ``shutdown`` (not the last will, which says ``connection lost``),
  and the recorder flushed: the recording ends with its stream's end mark and holds at least
  every frame the daemon had counted before the signal;
* SIGKILL: the recording replays to its last complete line (no bad line; ``streamer replay``
  of it exits 0) and holds what had been flushed;
* a fatal error (a feed URL the websocket client refuses) exits 1 (``Restart=on-failure``
  restarts it), logs ``service_failed`` and says why in the offline status;
* the watchdog: ``WATCHDOG=1`` datagrams on a test ``NOTIFY_SOCKET`` stop while a fit hangs
  (the ``STREAMER_TEST_HANG_FIT_S`` hook) or a connected feed is silent, and resume once it
  makes progress again; a healthy daemon keeps pinging through the same window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from streamer.daemon.service import Service
from streamer.events import FeedStatus, Heartbeat
from streamer.feeds.deribit.fake import FakeDeribitServer
from streamer.feeds.recordings.reader import ReplayStats, read_recording
from streamer.publish.memory import MemoryPublisher
from tests.conftest import REPO, UNIT
from tests.mosquitto import Mosquitto
from tests.test_service import chain_script, collect, service_config

INSTANCE = "proc-shard"
STATUS = f"streamer/status/{INSTANCE}"


def write_config(tmp: Path, fake_url: str, broker_url: str, extra: str = "") -> Path:
    path = tmp / "shard.toml"
    path.write_text(
        f"""
instance = "{INSTANCE}"
[feed]
url = "{fake_url}"
currencies = ["BTC"]
[models]
names = ["svi"]
[trigger]
min_changed_quotes = 100
min_interval_s = 0.05
warmup_s = 0.05
[publish]
urls = ["{broker_url}/streamer"]
[log]
format = "json"
{extra}
"""
    )
    return path


@contextlib.asynccontextmanager
async def daemon(
    config: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[dict[str, Any]]]]:
    """``streamer run --config`` as a child process; its JSON log lines collected."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "run", "--config", str(config),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    logs: list[dict[str, Any]] = []

    async def pump() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            with contextlib.suppress(ValueError):
                logs.append(json.loads(line))

    task = asyncio.create_task(pump())
    try:
        yield proc, logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await task


def online(d: dict[str, dict[str, Any]]) -> bool:
    return d.get(STATUS, {}).get("state") == "online" and ("streamer/deribit/BTC/svi/surface" in d)


def offline(d: dict[str, dict[str, Any]]) -> bool:
    return d.get(STATUS, {}).get("state") == "offline"


async def until(cond: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def logged(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == event]


async def frames_seen(port: int) -> int:
    """``streamer_frames_total`` from the daemon's metrics endpoint."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    for line in body.splitlines():
        if line.startswith("streamer_frames_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no streamer_frames_total in the metrics")


def metrics_port(logs: list[dict[str, Any]]) -> int:
    ready = logged(logs, "service_ready")
    assert ready and ready[0]["metrics_port"], ready
    return int(ready[0]["metrics_port"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_cleanly_with_shutdown_status_and_flushed_recording(
    mosquitto: Mosquitto, tmp_path: Path, sig: signal.Signals
) -> None:
    instruments, script = chain_script()
    rec = tmp_path / "rec"
    extra = f'[recorder]\ndir = "{rec}"\n[metrics]\nport = {_free_port()}\n'
    async with FakeDeribitServer(instruments=instruments, script=script, loops=None) as fake:
        cfg = write_config(tmp_path, fake.url, mosquitto.url, extra)
        async with daemon(cfg) as (proc, logs):
            seen = await collect(mosquitto.url, "streamer/#", online, 60 * UNIT)
            assert online(seen)
            before = await frames_seen(metrics_port(logs))
            t0 = time.monotonic()
            proc.send_signal(sig)
            rc = await asyncio.wait_for(proc.wait(), 10 * UNIT)
            took = time.monotonic() - t0
        status = await collect(mosquitto.url, STATUS, offline, 10 * UNIT)
    assert rc == 0 and took < 5.0 * UNIT
    assert status[STATUS]["reason"] == "shutdown"  # the daemon's goodbye, not the will
    stats = ReplayStats()
    (path,) = rec.glob("deribit-*.jsonl.zst")
    frames = list(read_recording(path, stats=stats))
    assert not stats.truncated and not stats.bad_lines  # closed: the stream's end is there
    assert len(frames) >= before > 0  # nothing the daemon had seen was lost


async def test_sigkill_leaves_a_recording_that_replays_to_its_last_line(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    instruments, script = chain_script()
    rec = tmp_path / "rec"
    extra = f'[recorder]\ndir = "{rec}"\n[metrics]\nport = {_free_port()}\n'
    async with FakeDeribitServer(instruments=instruments, script=script, loops=None) as fake:
        cfg = write_config(tmp_path, fake.url, mosquitto.url, extra)
        async with daemon(cfg) as (proc, logs):
            await collect(mosquitto.url, "streamer/#", online, 60 * UNIT)
            before = await frames_seen(metrics_port(logs))
            await asyncio.sleep(1.5)  # the ticker flushes the recorder every 0.1 s
            proc.kill()
            assert await asyncio.wait_for(proc.wait(), 10 * UNIT) == -signal.SIGKILL
    stats = ReplayStats()
    (path,) = rec.glob("deribit-*.jsonl.zst")
    frames = list(read_recording(path, stats=stats))
    assert stats.truncated and not stats.bad_lines  # cut off, yet every line read is whole
    assert len(frames) >= before > 0
    assert all(json.loads(f)["jsonrpc"] == "2.0" for _, _, f in frames)
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "replay", str(path), "--model", "none", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120 * UNIT, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


async def test_a_fatal_error_exits_non_zero_and_says_why(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, "ws://:99999/", mosquitto.url)  # no host: InvalidURI
    async with daemon(cfg) as (proc, logs):
        rc = await asyncio.wait_for(proc.wait(), 60 * UNIT)
    assert rc == 1
    failed = logged(logs, "service_failed")
    assert failed and "bad url" in failed[0]["error"]
    status = await collect(mosquitto.url, STATUS, offline, 10 * UNIT)
    assert status[STATUS]["reason"].startswith("failed:") and "bad url" in status[STATUS]["reason"]


# ------------------------------------------------------------------------------ watchdog


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.got: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        """Datagrams received since the last drain (also kept in ``got``)."""
        new: list[str] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return new
            msg = data.decode()
            self.got.append((time.monotonic(), msg))
            new.append(msg)

    def seen(self, message: str) -> bool:
        """Has ``message`` arrived (at any time so far)?"""
        self.drain()
        return message in [m for _, m in self.got]

    def close(self) -> None:
        self.sock.close()

    async def pings_within(self, seconds: float) -> int:
        """How many WATCHDOG=1 arrive in the next ``seconds``."""
        self.drain()
        await asyncio.sleep(seconds)
        return self.drain().count("WATCHDOG=1")


WATCHDOG_USEC = 200_000  # systemd's WatchdogSec=0.2 s: a ping every 0.1 s


@pytest.mark.parametrize("hang", [False, True])
async def test_watchdog_stops_when_a_fit_hangs(
    mosquitto: Mosquitto, tmp_path: Path, hang: bool
) -> None:
    """The real process with the fit-hang hook: pings, then none while the fit is stuck
    (``watchdog_withheld`` says which); without the hook it keeps pinging."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    if hang:
        env["STREAMER_TEST_HANG_FIT_S"] = "600"
    instruments, script = chain_script()
    try:
        async with FakeDeribitServer(instruments=instruments, script=script, loops=None) as fake:
            cfg = write_config(tmp_path, fake.url, mosquitto.url, "[watchdog]\nfit_s = 1.0\n")
            async with daemon(cfg, env) as (proc, logs):
                await until(lambda: notify.seen("READY=1"), 60 * UNIT)
                await until(lambda: notify.seen("WATCHDOG=1"), 30 * UNIT)  # pings at first
                if hang:
                    await until(lambda: bool(logged(logs, "watchdog_withheld")), 30 * UNIT)
                    stuck = logged(logs, "watchdog_withheld")[0]["stuck"]
                    assert list(stuck) == ["fit:deribit/BTC/svi"], stuck
                else:
                    await collect(mosquitto.url, "streamer/#", online, 60 * UNIT)
                # a window of 10 ping intervals: none while stuck, several while healthy
                pings = await notify.pings_within(10 * WATCHDOG_USEC / 2e6 * max(UNIT, 1.0))
                if hang:
                    assert pings == 0
                else:
                    assert pings >= 3 and not logged(logs, "watchdog_withheld")
                proc.send_signal(signal.SIGTERM)  # a hung fit must not block the shutdown
                assert await asyncio.wait_for(proc.wait(), 10 * UNIT) == 0
        assert notify.seen("STOPPING=1")
    finally:
        notify.close()


class _QuietFeed:
    """Connected, a few heartbeats, then silent until ``resume`` is set, then beats again."""

    def __init__(self) -> None:
        self.resume = asyncio.Event()

    async def events(self) -> Any:
        yield FeedStatus("deribit", "connected", time.time_ns(), "quiet")
        for _ in range(3):
            yield Heartbeat("deribit", time.time_ns(), False)
            await asyncio.sleep(0.05)
        await self.resume.wait()
        while True:
            yield Heartbeat("deribit", time.time_ns(), False)
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        pass


async def test_watchdog_stops_while_a_connected_feed_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    feed = _QuietFeed()
    cfg = service_config("ws://127.0.0.1:1", "mqtt://127.0.0.1:1")
    cfg = dataclasses.replace(cfg, watchdog=dataclasses.replace(cfg.watchdog, feed_s=0.5))
    service = Service(cfg, feed_factory=lambda *a: feed, publishers=[MemoryPublisher()])  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop, signals=False))
    try:
        await asyncio.wait_for(service.ready.wait(), 60 * UNIT)
        await until(lambda: bool(service.stuck()), 30 * UNIT)  # silent for feed_s
        assert [w for w, _ in service.stuck()] == ["feed"]
        withheld = service.watchdog_pings
        assert await notify.pings_within(1.0) == 0 and service.watchdog_pings == withheld
        feed.resume.set()  # the feed talks again: the pings come back
        await until(lambda: service.watchdog_pings > withheld, 30 * UNIT)
        assert not service.stuck()
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30 * UNIT) == 0
        notify.close()
