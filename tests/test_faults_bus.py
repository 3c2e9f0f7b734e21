"""Bus faults: mosquitto killed and restarted, or frozen (SIGSTOP) past the keepalive, mid-stream.

Checked the way Jepsen's total-queue checker checks a queue (every enqueue that was
acknowledged is dequeued at the end, after a final drain): here the daemon (fake Deribit ->
``Service`` -> ``MqttPublisher``) publishes retained QoS 1 state, every surface and greeks
payload carrying its surface's ``seq``; the test records what the broker acknowledged (PUBACK,
``MqttPublisher.on_ack``), and a subscriber in its own process (a bot: its own GIL and event
loop, reconnecting by itself) records everything it received. After the broker is back, the
daemon has stopped and the history is drained:

* **no acknowledged message lost**: "acknowledged" = PUBACK received for a QoS 1 publish.
  Topics are state, so a message is delivered when the subscriber received it *or a newer
  one of its topic* (latest wins): for every acknowledged ``(topic, seq)`` the subscriber's
  newest ``seq`` of that topic is at least ``seq``;
* **retained state converges**: a fresh subscriber finds, for every (underlying, model,
  expiry) the daemon publishes, the newest payload it published (the same ``seq``), and the
  status topic says ``offline`` / ``shutdown``; while the daemon runs, ``online``;
* **the daemon re-publishes its state after a reconnect**: the broker runs without
  persistence, so after a restart nothing is retained until the daemon sends it again; a quiet
  market (no new fit) shows it is the re-publication (``restored``), not fresh fits;
* **memory stays bounded while the broker is away**: the pending map is latest-per-topic, so
  it never holds more than one payload per topic (status + per model: surface + one greeks
  per expiry), however many fits happen meanwhile (the excess is counted as ``superseded``).

The last will on a killed daemon is ``tests/test_service.py::test_daemon_process_signals``
(``sigkill``: the broker says ``offline``, reason ``connection lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from streamer.daemon.service import Service
from streamer.feeds.deribit.fake import FakeDeribitServer
from streamer.publish.mqtt import MqttPublisher
from tests.conftest import UNIT
from tests.mosquitto import Mosquitto
from tests.test_service import chain_script, service_config

INSTANCE = "bus"
STATUS = f"streamer/status/{INSTANCE}"
MODELS = ("svi", "ssvi")
KEEPALIVE_S = 1  # the publisher's MQTT keepalive (s): a frozen broker is noticed quickly

SUBSCRIBER = r"""
import asyncio, json, sys, time
import aiomqtt

async def main(port):
    out = sys.stdout
    while True:
        try:
            async with aiomqtt.Client("127.0.0.1", port, keepalive=1, timeout=1.0) as client:
                await client.subscribe("streamer/#", qos=1)
                out.write(json.dumps({"event": "subscribed"}) + "\n"); out.flush()
                async for msg in client.messages:
                    raw = bytes(msg.payload)
                    body = json.loads(raw) if raw[:1] == b"{" else {}
                    out.write(json.dumps({
                        "topic": msg.topic.value, "retain": bool(msg.retain),
                        "seq": body.get("seq"), "state": body.get("state"),
                        "reason": body.get("reason"), "empty": not raw,
                    }) + "\n")
                    out.flush()
        except aiomqtt.MqttError as exc:
            out.write(json.dumps({"event": "lost", "error": str(exc)}) + "\n"); out.flush()
            await asyncio.sleep(0.1)

asyncio.run(main(int(sys.argv[1])))
"""


@dataclass
class Received:
    """What the subscriber process wrote, parsed as it arrives."""

    lines: list[dict[str, Any]] = field(default_factory=list)

    def newest(self) -> dict[str, int]:
        """Per topic, the newest seq received."""
        out: dict[str, int] = {}
        for r in self.lines:
            if r.get("seq") is not None:
                out[r["topic"]] = max(out.get(r["topic"], -1), int(r["seq"]))
        return out

    def subscribes(self) -> int:
        return sum(1 for r in self.lines if r.get("event") == "subscribed")

    def last_status(self) -> dict[str, Any] | None:
        got = [r for r in self.lines if r.get("topic") == STATUS]
        return got[-1] if got else None


@contextlib.asynccontextmanager
async def bot(broker: Mosquitto) -> AsyncIterator[Received]:
    """The subscriber process (own GIL, own event loop), its lines collected as they come."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUBSCRIBER, str(broker.port), stdout=asyncio.subprocess.PIPE
    )
    got = Received()

    async def pump() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            got.lines.append(json.loads(line))

    task = asyncio.create_task(pump())
    try:
        await until(lambda: got.subscribes() >= 1, 30 * UNIT)
        yield got
    finally:
        proc.terminate()
        await proc.wait()
        await task


async def until(cond: Any, timeout: float, every: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(every)


@dataclass
class Acked:
    """What the broker acknowledged (PUBACK), in order: (topic, seq or None, empty)."""

    items: list[tuple[str, int | None, bool]] = field(default_factory=list)

    def __call__(self, topic: str, data: bytes) -> None:
        seq = json.loads(data).get("seq") if data[:1] == b"{" else None
        self.items.append((topic, seq, not data))

    def newest(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for topic, seq, _ in self.items:
            if seq is not None:
                out[topic] = max(out.get(topic, -1), seq)
        return out


async def retained(broker: Mosquitto) -> dict[str, dict[str, Any]]:
    """Everything the broker retains under streamer/# now: a fresh subscriber's retained
    burst, whose end a marker message of the test's own (subscribed after it) shows."""
    out: dict[str, dict[str, Any]] = {}
    marker = f"bus-test/marker-{time.monotonic_ns()}"
    async with asyncio.timeout(30 * UNIT), aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe("streamer/#", qos=1)
        await client.subscribe(marker, qos=1)
        await client.publish(marker, b"end", qos=1)
        async for msg in client.messages:
            if msg.topic.value == marker:
                break
            raw = bytes(msg.payload)
            if msg.retain and raw:
                out[msg.topic.value] = json.loads(raw)
    return out


def topic_bound(acked: Acked, got: Received) -> int:
    """The topics the daemon has published to (status, and per model its surface, tenors
    and greeks topics, as acknowledged or received): the pending map's bound, however many
    fits happen."""
    return len({topic for topic, _, _ in acked.items} | set(got.newest()) | {STATUS})


def all_state_seen(got: Received, service: Service) -> bool:
    """The subscriber has seen the daemon's surfaces and the greeks of every listed expiry."""
    book = next(iter(service.pipeline.books), None)
    if book is None:
        return False
    newest = got.newest()
    expiries = {i.expiry for i in book.instruments()}
    for m in MODELS:
        if f"streamer/deribit/BTC/{m}/surface" not in newest:
            return False
        if any(f"streamer/deribit/BTC/{m}/greeks/{e}" not in newest for e in expiries):
            return False
    return True


@contextlib.asynccontextmanager
async def daemon(
    broker: Mosquitto, *, loops: int | None
) -> AsyncIterator[tuple[Service, MqttPublisher, Acked, asyncio.Event, asyncio.Task[int]]]:
    """fake Deribit -> Service -> MqttPublisher (short keepalive and timeouts) -> ``broker``."""
    instruments, script = chain_script(rounds=3)
    acked = Acked()
    async with FakeDeribitServer(
        instruments=instruments, script=script, loops=loops, interval_s=0.002 if loops else 0.0
    ) as fake:
        pub = MqttPublisher(
            host=broker.host,
            port=broker.port,
            instance=INSTANCE,
            keepalive=KEEPALIVE_S,
            timeout=1.0 * UNIT,
            backoff_initial=0.05,
            backoff_max=0.3,
            close_timeout=10.0 * UNIT,
        )
        pub.on_ack = acked
        async with pub:
            cfg = service_config(fake.url, broker.url)
            # leftover changes are fitted within 0.3 s: a quiet market is quiet soon
            cfg = dataclasses.replace(
                cfg, trigger=dataclasses.replace(cfg.trigger, max_interval_s=0.3)
            )
            service = Service(cfg, publishers=[pub])
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop, signals=False))
            try:
                yield service, pub, acked, stop, task
            finally:
                stop.set()
                await asyncio.wait_for(task, 30 * UNIT)


def check_history(acked: Acked, got: Received, final: dict[str, dict[str, Any]]) -> None:
    """The checker: no acknowledged message lost; the retained state is the newest."""
    newest = got.newest()
    lost = [(t, s) for t, s, _ in acked.items if s is not None and newest.get(t, -1) < s]
    assert not lost, f"{len(lost)} acknowledged messages never reached the subscriber: {lost[:5]}"
    cleared = {t for t, _, empty in acked.items if empty}
    for topic, seq in acked.newest().items():
        if topic in cleared:
            continue
        assert final[topic]["seq"] == seq, topic  # the newest acknowledged is what is retained
    assert final[STATUS]["state"] == "offline" and final[STATUS]["reason"] == "shutdown"


async def test_broker_killed_and_restarted_mid_stream(mosquitto: Mosquitto) -> None:
    async with bot(mosquitto) as got:
        async with daemon(mosquitto, loops=None) as (service, pub, acked, *_):
            await until(lambda: all_state_seen(got, service), 60 * UNIT)
            before, bound = len(acked.items), topic_bound(acked, got)
            mosquitto.kill()  # SIGKILL: no goodbye; persistence off: its retained state is gone
            await until(lambda: not pub.connected, 10 * UNIT)
            superseded, peak = pub.superseded, 0
            fits = sum(service.pipeline.fits.values())
            t_end = time.monotonic() + 2.0 * UNIT
            async with asyncio.timeout(60 * UNIT):
                while time.monotonic() < t_end or sum(service.pipeline.fits.values()) < fits + 20:
                    peak = max(peak, pub.pending)
                    await asyncio.sleep(0.01)
            # many fits while away, yet at most one pending payload per topic: latest wins
            assert sum(service.pipeline.fits.values()) >= fits + 20
            assert 0 < peak <= bound and pub.superseded > superseded
            assert len(pub._acked) <= bound - 1  # and one acknowledged payload per topic kept
            mosquitto.start()
            await until(lambda: pub.connected, 30 * UNIT)
            await until(lambda: got.subscribes() >= 2, 30 * UNIT)  # the bot is back too
            await until(lambda: len(acked.items) > before + bound, 30 * UNIT)
        assert pub.dropped == 0 and pub.reconnects >= 1
        final = await retained(mosquitto)
        await until(lambda: (got.last_status() or {}).get("state") == "offline", 10 * UNIT)
        check_history(acked, got, final)


async def test_broker_restart_in_a_quiet_market_restores_the_retained_state(
    mosquitto: Mosquitto,
) -> None:
    """No fit after the restart (the script played once: no quote changes), so whatever the
    broker retains afterwards the daemon re-published from what had been acknowledged."""
    async with daemon(mosquitto, loops=1) as (service, pub, acked, *_), bot(mosquitto) as got:
        await until(lambda: all_state_seen(got, service), 60 * UNIT)
        fits: dict[str, int] = {}
        while dict(service.pipeline.fits) != fits:  # no fit for 1 s (> 3 max intervals)
            fits = dict(service.pipeline.fits)
            await asyncio.sleep(1.0)
        await pub.flush(10 * UNIT)
        state = acked.newest()
        mosquitto.kill()
        await until(lambda: not pub.connected, 10 * UNIT)
        mosquitto.start()
        await until(lambda: pub.connected, 30 * UNIT)
        await pub.flush(10 * UNIT)
        after = await retained(mosquitto)
        assert dict(service.pipeline.fits) == fits  # nothing was fitted meanwhile
        assert {t: p["seq"] for t, p in after.items() if t != STATUS} == state
        assert pub.restored >= len(state)
        assert after[STATUS]["state"] == "online"


async def test_broker_frozen_past_the_keepalive(mosquitto: Mosquitto) -> None:
    """SIGSTOP for several keepalives (sockets open, nothing answered), then SIGCONT."""
    async with bot(mosquitto) as got:
        async with daemon(mosquitto, loops=None) as (service, pub, acked, *_):
            await until(lambda: all_state_seen(got, service), 60 * UNIT)
            bound = topic_bound(acked, got)
            mosquitto.pause()
            try:
                await until(lambda: not pub.connected, 10 * UNIT)  # PUBACKs time out
                peak, t_end = 0, time.monotonic() + 3.0 * KEEPALIVE_S
                while time.monotonic() < t_end:
                    peak = max(peak, pub.pending)
                    await asyncio.sleep(0.01)
                assert 0 < peak <= bound
            finally:
                mosquitto.resume()
            await until(lambda: pub.connected, 30 * UNIT)
            before = len(acked.items)
            await until(lambda: len(acked.items) > before + bound, 30 * UNIT)
            # the old connection's will may fire once the broker wakes up; the status must end
            # up "online" while the daemon runs
            await asyncio.sleep(3.0 * KEEPALIVE_S)
            live = await retained(mosquitto)
            assert live[STATUS]["state"] == "online", live[STATUS]
        assert pub.dropped == 0
        final = await retained(mosquitto)
        await until(lambda: (got.last_status() or {}).get("state") == "offline", 10 * UNIT)
        check_history(acked, got, final)
