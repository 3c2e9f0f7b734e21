"""Beyond one machine: two shards on two brokers joined by mosquitto's own MQTT bridge.

Two real daemon processes (``streamer run``), a BTC shard publishing into broker A and an ETH
shard into broker B, each fed by its own fake Deribit server on loopback; broker B bridges
``streamer/#`` both ways to broker A (mosquitto's ``connection`` block: an existing broker
feature, not a home-made relay). A subscriber on B sees both shards' retained surfaces and
statuses; the BTC shard is killed (-9) and restarted: B shows its will (``offline``), then
its new surfaces arrive (higher ``seq`` after the restart is not required: the restarted
shard starts again at 1, so the check is on fresh ``ts_ms`` and the status going back online).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from streamer.daemon.pipeline import Pipeline
from streamer.feeds.deribit.fake import FakeDeribitServer, ScriptFrame
from tests.conftest import UNIT
from tests.mosquitto import Mosquitto, find_mosquitto
from tests.synth import deribit_chain, make_chain, svi_surface

REPO = Path(__file__).resolve().parent.parent
FUTURE_MS = 1_893_484_800_000  # 2030-01-01 08:00 UTC


def chain(underlying: str, rounds: int = 4) -> tuple[list[dict[str, Any]], list[ScriptFrame]]:
    """A synthetic chain re-quoted ``rounds`` times with fresh noise (real changes: a loop of
    the script keeps the daemon refitting)."""
    _, fn = svi_surface(days=(7, 30, 91))
    rng = np.random.default_rng(7)
    instruments: list[dict[str, Any]] = []
    script: list[ScriptFrame] = []
    for r in range(rounds):
        snap = make_chain(fn, days=(7, 30, 91), noise_iv=0.003, rng=rng, ts_ms=FUTURE_MS + 250 * r)
        snap = dataclasses.replace(snap, underlying=underlying)
        instruments, tickers = deribit_chain(snap)
        script += [ScriptFrame(f"ticker.{t['instrument_name']}", t) for t in tickers]
    return instruments, script


@pytest.fixture(scope="module")
def compiled() -> None:
    """SVI's kernels compiled into the numba cache the daemons load from: on a fresh clone
    (an empty cache) two shards starting together would otherwise both compile them, slowly
    enough on a loaded machine to run past the test's wait for their first surfaces."""
    Pipeline(models=["svi"]).warm_up()


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (scripts/install apt-installs it)")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Mosquitto(binary, tmp_path / "a")
    b = Mosquitto(
        binary,
        tmp_path / "b",
        extra_config=(
            "connection to-a\n"
            f"address 127.0.0.1:{a.port}\n"
            "topic streamer/# both 1\n"
            "try_private true\n"  # the remote is a broker: retain flags are kept
            "restart_timeout 1 2\n"
            "notifications false\n"
        ),
    )
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


def daemon(config: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "STREAMER__LOG__LEVEL": "warning"}
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", "run", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def shard_config(tmp: Path, name: str, cur: str, feed_url: str, broker: Mosquitto) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f'instance = "{name}"\n'
        f'[feed]\nurl = "{feed_url}"\ncurrencies = ["{cur}"]\n'
        '[models]\nnames = ["svi"]\n'
        "[trigger]\nmin_changed_quotes = 50\nmin_interval_s = 0.2\nwarmup_s = 0.2\n"
        f'[publish]\nurls = ["{broker.url}/streamer"]\ngreeks = false\n'
    )
    return path


async def watch(url: str, until: Any, timeout: float) -> dict[str, dict[str, Any]]:
    """Latest payload per topic under ``streamer/#`` on ``url`` until ``until(latest)``."""
    host, port = url.removeprefix("mqtt://").split(":")
    latest: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client(host, int(port)) as client:
        await client.subscribe("streamer/#", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for msg in client.messages:
                    raw = msg.payload
                    if isinstance(raw, bytes | bytearray) and raw[:1] == b"{":
                        latest[msg.topic.value] = json.loads(raw)
                    if until(latest):
                        break
    return latest


BTC = "streamer/deribit/BTC/svi/surface"
ETH = "streamer/deribit/ETH/svi/surface"


async def test_two_shards_through_a_bridge_survive_a_shard_restart(
    compiled: None, brokers: tuple[Mosquitto, Mosquitto], tmp_path: Path
) -> None:
    a, b = brokers
    btc_inst, btc_script = chain("BTC")
    eth_inst, eth_script = chain("ETH")
    async with (
        FakeDeribitServer(
            instruments=btc_inst, script=btc_script, loops=None, interval_s=0.002
        ) as btc_feed,
        FakeDeribitServer(
            instruments=eth_inst, script=eth_script, loops=None, interval_s=0.002
        ) as eth_feed,
    ):
        btc_cfg = shard_config(tmp_path, "shard-btc", "BTC", btc_feed.url, a)
        eth_cfg = shard_config(tmp_path, "shard-eth", "ETH", eth_feed.url, b)
        procs = [daemon(btc_cfg), daemon(eth_cfg)]
        try:
            # a subscriber on B: the ETH shard is local, the BTC one comes over the bridge
            both = await watch(b.url, lambda d: BTC in d and ETH in d, 90 * UNIT)
            assert both[BTC]["underlying"] == "BTC" and both[ETH]["underlying"] == "ETH"
            statuses = {t: p for t, p in both.items() if t.startswith("streamer/status/")}
            assert {"streamer/status/shard-btc", "streamer/status/shard-eth"} <= set(statuses)
            # retained: a subscriber arriving later on B gets both at once
            late = await watch(b.url, lambda d: BTC in d and ETH in d, 10 * UNIT)
            assert BTC in late and ETH in late
            # the BTC shard dies hard: its will arrives on B through the bridge
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            gone = await watch(
                b.url,
                lambda d: d.get("streamer/status/shard-btc", {}).get("state") == "offline",
                30 * UNIT,
            )
            assert gone["streamer/status/shard-btc"]["state"] == "offline"
            before = gone.get(BTC, both[BTC])["ts_ms"]
            # restarted, it publishes again, and B keeps receiving it (and ETH meanwhile)
            t0 = time.monotonic()
            procs[0] = daemon(btc_cfg)
            back = await watch(
                b.url,
                lambda d: (
                    d.get("streamer/status/shard-btc", {}).get("state") == "online"
                    and d.get(BTC, {}).get("ts_ms", 0) > before
                    and ETH in d
                ),
                90 * UNIT,
            )
            assert back["streamer/status/shard-btc"]["state"] == "online", time.monotonic() - t0
            assert back[BTC]["ts_ms"] > before and back[ETH]["underlying"] == "ETH"
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(15)
                if p.poll() is None:
                    p.kill()
                    p.wait(10)  # reaped: no "still running" warning in a later test
