"""MQTT publish latency: ``publish()`` -> a subscriber's decoded payload, through mosquitto.

Starts a private mosquitto on a free 127.0.0.1 port (or uses ``--url``), connects an
``MqttPublisher`` and a plain aiomqtt subscriber in the same event loop, and measures

- round trip: ``publish()`` called -> payload decoded by the subscriber (QoS 1, retained), one
  message at a time, for a surface payload (10 expiries) and a greeks payload (60 instruments);
- ``publish()`` call cost (encode + latest-wins queue), the part the service's loop pays;
- a burst: 200 "fits" of 1 surface + 10 greeks topics back to back, time until the subscriber
  holds the latest of every topic, and how many intermediate messages were superseded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from streamer.publish.mqtt import NODELAY, MqttPublisher
from streamer.publish.payloads import (
    greeks_payload,
    greeks_row,
    surface_payload,
    topic_greeks,
    topic_surface,
)

EXPIRIES = [f"{d}MAR25" for d in range(1, 11)]


def _surface(seq: int) -> dict[str, Any]:
    expiries = [
        {
            "expiry": code,
            "expiry_ms": 1_740_000_000_000 + i * 86_400_000,
            "T": 0.01 * (i + 1),
            "forward": 90_000.0 + 50 * i,
            "atm_iv": 0.55 + 0.01 * i,
            "params": {"a": 0.01, "b": 0.1, "rho": -0.3, "m": 0.0, "sigma": 0.2},
            "rmse_iv": 0.004,
            "in_band": 0.9,
            "n_quotes": 60,
        }
        for i, code in enumerate(EXPIRIES)
    ]
    fit = {
        "rmse_iv": 0.004,
        "in_band": 0.9,
        "n_quotes": 600,
        "nfev": 12,
        "elapsed_ms": 2.5,
        "warm": True,
        "regime_shift": False,
        "penalty": 0.001,
    }
    return dict(
        surface_payload(
            venue="deribit",
            underlying="BTC",
            model="svi",
            ts_ms=int(time.time() * 1000),
            seq=seq,
            status="ok",
            fit=fit,
            params={},
            expiries=expiries,
        )
    )


def _greeks(seq: int, expiry: str) -> dict[str, Any]:
    rows = [
        greeks_row(
            instrument=f"BTC-{expiry}-{60_000 + 2_000 * j}-{'C' if j % 2 else 'P'}",
            strike=60_000.0 + 2_000 * j,
            type="C" if j % 2 else "P",
            iv=0.6,
            price_coin=0.01,
            price_usd=900.0,
            delta=0.5,
            delta_premium_adj=0.49,
            gamma=1e-5,
            vega=30.0,
            theta=-50.0,
            vanna=0.1,
            volga=2.0,
            bid_iv=0.59,
            ask_iv=0.61,
        )
        for j in range(60)
    ]
    return dict(
        greeks_payload(
            ts_ms=int(time.time() * 1000),
            seq=seq,
            expiry=expiry,
            forward=9e4,
            T=0.02,
            instruments=rows,
        )
    )


@contextlib.contextmanager
def _broker() -> Iterator[tuple[str, int]]:
    binary = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    binary = binary or shutil.which("mosquitto")
    if binary is None:
        raise SystemExit("mosquitto not found: install it or pass --url mqtt://host:port")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\n"
        )
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("mosquitto did not start") from None
                    time.sleep(0.01)
            yield "127.0.0.1", port
        finally:
            proc.terminate()
            proc.wait(timeout=5)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _measure(host: str, port: int, n: int) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    inbox: asyncio.Queue[tuple[str, dict[str, Any], int]] = asyncio.Queue()
    async with (
        aiomqtt.Client(host, port, socket_options=NODELAY) as sub,
        MqttPublisher(host=host, port=port, prefix="bench", instance="bench") as pub,
    ):
        await sub.subscribe("bench/#", qos=1)
        await pub.wait_connected(10)

        async def pump() -> None:
            async for m in sub.messages:
                assert isinstance(m.payload, bytes)
                inbox.put_nowait((str(m.topic), orjson.loads(m.payload), time.perf_counter_ns()))

        pump_task = asyncio.create_task(pump())
        try:
            for label, topic, make in (
                (
                    "surface (10 expiries)",
                    topic_surface("bench", "deribit", "BTC", "svi"),
                    _surface,
                ),
                (
                    "greeks (60 instruments)",
                    topic_greeks("bench", "deribit", "BTC", "svi", EXPIRIES[0]),
                    lambda s: _greeks(s, EXPIRIES[0]),
                ),
            ):
                size = len(orjson.dumps(make(0)))
                lat: list[float] = []
                for seq in range(n):
                    payload = make(seq)
                    t0 = time.perf_counter_ns()
                    await pub.publish(topic, payload)
                    while True:
                        got_topic, got, t1 = await asyncio.wait_for(inbox.get(), 10)
                        if got_topic == topic and got.get("seq") == seq:
                            break
                    lat.append((t1 - t0) / 1e3)
                rows.append(
                    (
                        f"round trip {label}, {size:,} B, n={n}",
                        f"p50 {_pct(lat, 0.5):,.0f} us, p99 {_pct(lat, 0.99):,.0f} us, "
                        f"max {max(lat):,.0f} us",
                    )
                )
            # publish() call cost: encode + queue, no waiting
            payload = _surface(0)
            calls = 2_000
            t0 = time.perf_counter_ns()
            for i in range(calls):
                await pub.publish(f"bench/cost/{i % 20}", payload)
            dt = (time.perf_counter_ns() - t0) / calls / 1e3
            rows.append(("publish() call, surface payload", f"{dt:,.1f} us per call"))
            await pub.flush(30)
            while not inbox.empty():
                inbox.get_nowait()
            # burst
            fits = 200
            superseded0 = pub.superseded
            topics = [topic_surface("bench", "deribit", "BTC", "burst")] + [
                topic_greeks("bench", "deribit", "BTC", "burst", e) for e in EXPIRIES
            ]
            greeks = [_greeks(0, e) for e in EXPIRIES]
            t0 = time.perf_counter_ns()
            for seq in range(fits):
                await pub.publish(topics[0], _surface(seq))
                for topic, g in zip(topics[1:], greeks, strict=True):
                    await pub.publish(topic, {**g, "seq": seq})
                await asyncio.sleep(0)
            done: set[str] = set()
            while len(done) < len(topics):
                got_topic, got, t1 = await asyncio.wait_for(inbox.get(), 30)
                if got_topic in topics and got.get("seq") == fits - 1:
                    done.add(got_topic)
            rows.append(
                (
                    f"burst {fits} fits x {len(topics)} topics",
                    f"all latest delivered after {(t1 - t0) / 1e6:,.1f} ms, "
                    f"{pub.superseded - superseded0:,} superseded, "
                    f"{fits * len(topics) - (pub.superseded - superseded0):,} sent",
                )
            )
        finally:
            pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await pump_task
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer bench mqtt", description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="use this broker (mqtt://host:port) instead of a private one")
    ap.add_argument("-n", type=int, default=1_000, help="round trips per payload")
    args = ap.parse_args(argv)
    import structlog

    if not structlog.is_configured():
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if args.url:
        from streamer.publish.urls import parse_mqtt_url

        parsed = parse_mqtt_url(args.url)
        rows = asyncio.run(_measure(parsed.host, parsed.port, args.n))
    else:
        with _broker() as (host, port):
            rows = asyncio.run(_measure(host, port, args.n))
    print("| measurement | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result} |")
    return 0
