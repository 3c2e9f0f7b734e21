"""A model that is switched off leaves no retained topics behind (a real mosquitto).

The broker holds what an earlier run published, SABR included; the daemon now runs SVI and
SSVI on BTC. At start it lists its own retained topics (``{prefix}/{venue}/BTC/+/#``) and
clears those of SABR; topics of other underlyings, other venues, other prefixes and
segments that are not model names stay untouched.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiomqtt

from streamer.daemon.service import Service
from streamer.events import FeedStatus
from tests.conftest import UNIT
from tests.mosquitto import Mosquitto
from tests.test_service import service_config

OURS_OFF = [  # BTC topics of a registered model this shard no longer runs: cleared
    "streamer/deribit/BTC/sabr/surface",
    "streamer/deribit/BTC/sabr/greeks/3JAN30",
    "streamer/deribit/BTC/sabr/tenors",
    "streamer/deribit/BTC/heston/surface",
]
KEPT = [
    "streamer/deribit/BTC/svi/surface",  # a model it runs
    "streamer/deribit/ETH/sabr/surface",  # another underlying (another shard's)
    "streamer/okx/BTC/sabr/surface",  # another venue
    "other/deribit/BTC/sabr/surface",  # another prefix
    "streamer/deribit/BTC/notes/readme",  # not a model name
    "streamer/status/old-shard",
]


class _Quiet:
    """Connected, then nothing: no fit, so only the start-up sweep publishes."""

    async def events(self) -> Any:
        yield FeedStatus("deribit", "connected", time.time_ns(), "quiet")
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        pass


async def retained(broker: Mosquitto) -> set[str]:
    """Topics holding a retained message (a fresh subscriber; a marker ends the burst)."""
    found: set[str] = set()
    marker = f"test/marker-{time.monotonic_ns()}"
    async with asyncio.timeout(30 * UNIT), aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe("#", qos=1)
        await client.publish(marker, b"end", qos=1)
        async for msg in client.messages:
            if msg.topic.value == marker:
                return found
            if msg.retain and msg.payload:
                found.add(msg.topic.value)
    return found


async def test_switched_off_models_are_cleared_at_start(mosquitto: Mosquitto) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        for topic in OURS_OFF + KEPT:
            await client.publish(topic, b'{"seq": 7}', qos=1, retain=True)
    assert set(OURS_OFF + KEPT) <= await retained(mosquitto)
    service = Service(
        service_config("ws://127.0.0.1:1", mosquitto.url),  # models svi + ssvi, BTC
        feed_factory=lambda *a: _Quiet(),  # type: ignore[arg-type]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop, signals=False))
    try:
        await asyncio.wait_for(service.ready.wait(), 60 * UNIT)
        async with asyncio.timeout(30 * UNIT):
            while len(service.cleared) < len(OURS_OFF):
                await asyncio.sleep(0.05)
        await service.publishers[0].flush(10 * UNIT)  # type: ignore[attr-defined]
        left = await retained(mosquitto)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30 * UNIT) == 0
    assert sorted(service.cleared) == sorted(OURS_OFF)
    assert not left & set(OURS_OFF)  # gone for every new subscriber
    assert set(KEPT) <= left  # and nothing else touched
