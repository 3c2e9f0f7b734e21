"""MQTT publisher, subscriber client and ``streamer subscribe`` against a real mosquitto.

The broker runs on a free 127.0.0.1 port (``tests.mosquitto``); subscribers in these tests are
plain aiomqtt clients, independent of the code under test, so QoS and retain flags are what the
broker really delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest

from streamer.client.render import render
from streamer.client.subscribe import subscribe_payloads
from streamer.errors import InputError, PublishError, SubscribeError
from streamer.publish.base import decode, encode
from streamer.publish.memory import MemoryPublisher
from streamer.publish.mqtt import MqttPublisher
from streamer.publish.payloads import (
    greeks_payload,
    load_schema,
    surface_payload,
    topic_greeks,
    topic_surface,
)
from streamer.publish.urls import from_url
from tests.conftest import UNIT
from tests.mosquitto import Mosquitto, free_port

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0 * UNIT  # generous upper bound; tests finish in milliseconds when things work


@contextlib.asynccontextmanager
async def subscriber(
    broker: Mosquitto, topic: str
) -> AsyncIterator[asyncio.Queue[aiomqtt.Message]]:
    """A plain aiomqtt subscriber (QoS 1) pumping messages into a queue."""
    queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)

        async def pump() -> None:
            async for message in client.messages:
                queue.put_nowait(message)

        task = asyncio.create_task(pump())
        try:
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def next_message(queue: asyncio.Queue[aiomqtt.Message]) -> tuple[aiomqtt.Message, Any]:
    message = await asyncio.wait_for(queue.get(), TIMEOUT)
    assert isinstance(message.payload, bytes)
    return message, decode(message.payload)


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


def _surface(seq: int = 1) -> dict[str, Any]:
    return dict(
        surface_payload(
            venue="deribit",
            underlying="BTC",
            model="svi",
            ts_ms=1613044800000,
            seq=seq,
            status="ok",
            fit={
                "rmse_iv": 0.0042,
                "in_band": 0.91,
                "n_quotes": 312,
                "nfev": 14,
                "elapsed_ms": 3.2,
                "warm": True,
                "regime_shift": False,
                "penalty": float("nan"),
            },
            params={},
            expiries=[
                {
                    "expiry": "12FEB21",
                    "expiry_ms": 1613116800000,
                    "T": 0.00822,
                    "forward": 47812.5,
                    "atm_iv": 0.6234,
                    "params": {"a": 0.001, "b": 0.12, "rho": -0.2, "m": 0.01, "sigma": 0.1},
                    "rmse_iv": 0.004,
                    "in_band": 0.95,
                    "n_quotes": 40,
                }
            ],
        )
    )


def _greeks() -> dict[str, Any]:
    row = {
        "instrument": "BTC-12FEB21-48000-C",
        "strike": 48000.0,
        "type": "C",
        "iv": 0.62,
        "price_coin": 0.0181,
        "price_usd": 865.4,
        "delta": 0.49,
        "delta_premium_adj": 0.4719,
        "gamma": 0.00016,
        "vega": 11.3,
        "theta": -420.0,
        "vanna": 0.05,
        "volga": 3.1,
        "bid_iv": 0.6,
        "ask_iv": None,
    }
    return dict(
        greeks_payload(
            ts_ms=1613044800000,
            seq=1,
            expiry="12FEB21",
            forward=47812.5,
            T=0.00822,
            instruments=[row],
        )
    )


def _publisher(broker: Mosquitto, instance: str = "test", **kwargs: Any) -> MqttPublisher:
    kwargs.setdefault("backoff_initial", 0.05)
    kwargs.setdefault("backoff_max", 0.2)
    pub = from_url(broker.url, instance=instance, **kwargs)
    assert isinstance(pub, MqttPublisher)
    return pub


SURFACE_TOPIC = topic_surface("streamer", "deribit", "BTC", "svi")
GREEKS_TOPIC = topic_greeks("streamer", "deribit", "BTC", "svi", "12FEB21")


async def test_retained_surface_arrives_with_qos1(mosquitto: Mosquitto) -> None:
    surface = _surface()
    async with _publisher(mosquitto) as pub:
        await pub.wait_connected(TIMEOUT)
        await pub.publish(SURFACE_TOPIC, surface)
        await pub.flush(TIMEOUT)
        # a subscriber that comes later gets it as a retained message
        async with subscriber(mosquitto, SURFACE_TOPIC) as queue:
            message, payload = await next_message(queue)
        assert message.retain and message.qos == 1
        assert str(message.topic) == SURFACE_TOPIC
        jsonschema.validate(payload, load_schema("surface"))
        assert payload == decode(json.dumps(surface, allow_nan=True).replace("NaN", "null"))
        assert payload["fit"]["penalty"] is None
        stats = pub.stats()
        assert stats.connected and stats.published == 2  # status + surface
        assert (stats.superseded, stats.dropped, stats.reconnects, stats.pending) == (0, 0, 0, 0)


async def test_encoded_greeks_arrive_byte_for_byte(mosquitto: Mosquitto) -> None:
    """A payload the derived worker encoded (``deliver`` of bytes) goes out as those bytes:
    the same message a bot gets when the publisher encodes the dict itself."""
    greeks = _greeks()
    data = encode(greeks)
    async with _publisher(mosquitto) as pub, subscriber(mosquitto, GREEKS_TOPIC) as queue:
        await pub.wait_connected(TIMEOUT)
        await pub.deliver(GREEKS_TOPIC, data)
        message, payload = await next_message(queue)
        assert message.payload == data and message.qos == 1
        jsonschema.validate(payload, load_schema("greeks"))
        await pub.publish(GREEKS_TOPIC, greeks)
        again, _ = await next_message(queue)
        assert again.payload == data
        with pytest.raises(InputError, match="topic"):
            await pub.publish_encoded("bad/#/topic", data)
        async with subscriber(mosquitto, GREEKS_TOPIC) as later:  # kept as the retained one
            kept, _ = await next_message(later)
        assert kept.retain and kept.payload == data


async def test_status_online_feed_state_and_offline_on_close(mosquitto: Mosquitto) -> None:
    schema = load_schema("status")
    async with subscriber(mosquitto, "streamer/status/#") as queue:
        pub = _publisher(mosquitto, instance="deribit-btc")
        async with pub:
            message, online = await next_message(queue)
            assert str(message.topic) == "streamer/status/deribit-btc" and message.qos == 1
            jsonschema.validate(online, schema)
            assert online["state"] == "online" and online["instance"] == "deribit-btc"
            assert online["uptime_s"] >= 0 and online["feeds"] == {}
            pub.set_feed_state("deribit", {"state": "connected", "frames": 12})
            _, updated = await next_message(queue)
            jsonschema.validate(updated, schema)
            assert updated["state"] == "online"
            assert updated["feeds"] == {"deribit": {"state": "connected", "frames": 12}}
        _, offline = await next_message(queue)
        jsonschema.validate(offline, schema)
        assert offline["state"] == "offline" and offline["reason"] == "shutdown"
    # retained: a later subscriber learns the instance is offline
    async with subscriber(mosquitto, "streamer/status/deribit-btc") as queue:
        message, last = await next_message(queue)
    assert message.retain and last["state"] == "offline"
    with pytest.raises(PublishError, match="closed"):
        await pub.publish(SURFACE_TOPIC, {})


_VICTIM = """
import asyncio, sys
from streamer.publish.urls import from_url

async def main():
    async with from_url(sys.argv[1], instance="victim") as pub:
        await pub.wait_connected(10)
        await pub.publish("streamer/deribit/BTC/svi/surface", {"seq": 1})
        await pub.flush(10)
        print("ready", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_last_will_offline_when_process_is_killed(mosquitto: Mosquitto) -> None:
    async with subscriber(mosquitto, "streamer/status/victim") as queue:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _VICTIM, mosquitto.url, cwd=REPO, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30 * UNIT):
                while (line := await proc.stdout.readline()).strip() != b"ready":
                    assert line, "the publisher process died before it was ready"
            _, online = await next_message(queue)
            assert online["state"] == "online"
            proc.kill()  # SIGKILL: no clean shutdown, the broker must send the will
            await proc.wait()
            message, offline = await next_message(queue)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert message.qos == 1
    jsonschema.validate(offline, load_schema("status"))
    assert offline["state"] == "offline" and offline["reason"] == "connection lost"
    assert offline["uptime_s"] is None
    async with subscriber(mosquitto, "streamer/status/victim") as queue:
        message, last = await next_message(queue)
    assert message.retain and last["state"] == "offline"


async def test_broker_restart_delivers_latest_per_topic_bounded(mosquitto: Mosquitto) -> None:
    topics = [f"streamer/deribit/BTC/m{i}/surface" for i in range(3)]
    async with _publisher(mosquitto, instance="restart") as pub:
        await pub.wait_connected(TIMEOUT)
        await pub.publish(topics[0], {"seq": -1})
        await pub.flush(TIMEOUT)
        mosquitto.stop()
        await wait_until(lambda: not pub.connected)
        rounds = 50
        for seq in range(rounds):
            for topic in topics:
                await pub.publish(topic, {"seq": seq, "topic": topic})
        # bounded: one pending message per topic, the rest counted as superseded
        assert pub.pending == len(topics)
        assert pub.superseded == (rounds - 1) * len(topics)
        await asyncio.sleep(0.3)  # a few failed reconnect attempts
        assert not pub.connected and pub.pending == len(topics)
        mosquitto.start()  # same port; persistence is off, so nothing retained survived
        await pub.wait_connected(TIMEOUT)
        await pub.flush(TIMEOUT)
        stats = pub.stats()
        assert stats.reconnects == 1 and stats.connects == 2 and stats.pending == 0
        async with subscriber(mosquitto, "streamer/#") as queue:
            got: dict[str, Any] = {}
            while len(got) < len(topics) + 1:
                message, payload = await next_message(queue)
                assert message.retain
                got[str(message.topic)] = payload
    assert {t: got[t] for t in topics} == {t: {"seq": rounds - 1, "topic": t} for t in topics}
    assert got["streamer/status/restart"]["state"] == "online"


async def test_buffers_until_the_broker_first_appears(mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    async with _publisher(mosquitto, instance="late") as pub:
        await pub.publish(SURFACE_TOPIC, {"seq": 1})
        await pub.publish(SURFACE_TOPIC, {"seq": 2})
        await asyncio.sleep(0.15)
        assert not pub.connected and pub.pending == 1 and pub.superseded == 1
        mosquitto.start()
        await pub.wait_connected(TIMEOUT)
        await pub.flush(TIMEOUT)
    async with subscriber(mosquitto, SURFACE_TOPIC) as queue:
        _, payload = await next_message(queue)
    assert payload == {"seq": 2}


async def test_wait_sent_returns_once_acknowledged_and_at_once_without_a_broker(
    mosquitto: Mosquitto,
) -> None:
    """``wait_sent`` (the service holds its feed on it): back once the broker has
    acknowledged what was handed over; with the broker away, at once (the messages wait
    for the broker, the feed does not)."""
    async with _publisher(mosquitto, instance="sent") as pub:
        await pub.wait_connected(TIMEOUT)
        await pub.flush(TIMEOUT)
        published = pub.published
        for seq in range(20):
            await pub.publish(topic_greeks("streamer", "deribit", "BTC", "svi", f"{seq}FEB21"),
                              {"seq": seq})  # fmt: skip
        await pub.wait_sent(TIMEOUT)
        assert pub.pending == 0 and pub.stats().pending == 0 and pub.published == published + 20
        mosquitto.stop()
        await wait_until(lambda: not pub.connected)
        await pub.publish(SURFACE_TOPIC, {"seq": 1})
        started = time.monotonic()
        await pub.wait_sent(TIMEOUT)
        assert time.monotonic() - started < 0.5 * TIMEOUT and pub.pending == 1
        mosquitto.start()


async def test_close_with_broker_away_counts_dropped(mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    pub = _publisher(mosquitto, instance="gone", close_timeout=0.5)
    with pytest.raises(PublishError, match="not started"):
        await pub.publish(SURFACE_TOPIC, {})
    async with pub:
        with pytest.raises(InputError, match="topic"):
            await pub.publish("streamer/+/bad", {})
        await pub.publish(SURFACE_TOPIC, {"seq": 1})
        await pub.publish(GREEKS_TOPIC, {"seq": 1})
        started = time.monotonic()
    assert time.monotonic() - started < 2.0 * UNIT  # close_timeout 0.5 s bounds aclose
    assert pub.dropped == 2 and pub.published == 0 and not pub.connected


async def test_subscribe_payloads_client(mosquitto: Mosquitto) -> None:
    async with _publisher(mosquitto) as pub:
        await pub.publish(SURFACE_TOPIC, _surface())
        await pub.publish(GREEKS_TOPIC, _greeks())
        await pub.flush(TIMEOUT)
    got: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(TIMEOUT):
        async with contextlib.aclosing(
            subscribe_payloads(mosquitto.url, "streamer/deribit/#")
        ) as stream:
            async for topic, payload in stream:
                got[topic] = payload
                if len(got) == 2:
                    break
    assert got[SURFACE_TOPIC]["expiries"][0]["atm_iv"] == 0.6234
    assert got[GREEKS_TOPIC]["instruments"][0]["ask_iv"] is None
    with pytest.raises(SubscribeError, match="failed"):
        async with contextlib.aclosing(
            subscribe_payloads(f"mqtt://127.0.0.1:{free_port()}", "x", reconnect=False)
        ) as stream:
            async for _ in stream:
                pass


async def _run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamer",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60 * UNIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_streamer_subscribe_cli_end_to_end(mosquitto: Mosquitto) -> None:
    memory = MemoryPublisher()
    async with _publisher(mosquitto, instance="cli") as pub:
        for target in (pub, memory):
            await target.publish(SURFACE_TOPIC, _surface())
            await target.publish(GREEKS_TOPIC, _greeks())
        await pub.flush(TIMEOUT)
        code, out, err = await _run_cli(
            "subscribe", "streamer/deribit/#", "--url", mosquitto.url, "--json", "--count", "2",
            "--timeout", str(30 * UNIT),
        )  # fmt: skip
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert {m["topic"]: m["payload"] for m in lines} == memory.retained

        code, out, err = await _run_cli(
            "subscribe", SURFACE_TOPIC, "--url", mosquitto.url, "--count", "1",
            "--timeout", str(30 * UNIT),
        )  # fmt: skip
        assert code == 0, err
        assert "12FEB21" in out and "62.34%" in out and "47,812.50" in out
        assert "rho=-0.2" in out and "in_band" in out and "seq 1" in out

        code, out, err = await _run_cli(
            "subscribe", GREEKS_TOPIC, "--url", mosquitto.url, "--count", "1",
            "--timeout", str(30 * UNIT),
        )  # fmt: skip
        assert code == 0, err
        assert "1 instruments (1 C, 0 P)" in out and "BTC-12FEB21-48000-C" in out

        code, out, err = await _run_cli(
            "subscribe", "nothing/here", "--url", mosquitto.url, "--count", "1", "--timeout", "0.5"
        )
        assert code == 1 and "timeout" in err and out == ""


def _tls_broker_config(tmp_path: Path) -> tuple[str, Path]:
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("openssl and mosquitto_passwd are needed for the TLS/password test")
    cert, key, passwd = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "passwd"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwd), "bot", "s3cret:/@"],
        check=True,
        capture_output=True,
    )
    for path in (cert, key, passwd):
        path.chmod(0o644)
    config = f"certfile {cert}\nkeyfile {key}\npassword_file {passwd}\nallow_anonymous false\n"
    return config, cert


async def test_tls_and_password_from_url_and_env(
    mosquitto_factory: Callable[[str], Mosquitto],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, cert = _tls_broker_config(tmp_path)
    broker = mosquitto_factory(config)
    url = f"mqtts://bot:s3cret%3A%2F%40@127.0.0.1:{broker.port}"
    async with from_url(url, instance="tls", cafile=str(cert), backoff_max=0.2) as pub:
        assert isinstance(pub, MqttPublisher)
        await pub.wait_connected(TIMEOUT)
        await pub.publish(SURFACE_TOPIC, {"seq": 7})
        await pub.flush(TIMEOUT)
    # the subscriber client takes credentials and CA file from the environment
    monkeypatch.setenv("STREAMER_MQTT_USERNAME", "bot")
    monkeypatch.setenv("STREAMER_MQTT_PASSWORD", "s3cret:/@")
    monkeypatch.setenv("STREAMER_MQTT_CAFILE", str(cert))
    async with asyncio.timeout(TIMEOUT):
        async with contextlib.aclosing(
            subscribe_payloads(f"mqtts://127.0.0.1:{broker.port}", SURFACE_TOPIC)
        ) as stream:
            topic, payload = await anext(stream)
    assert (topic, payload) == (SURFACE_TOPIC, {"seq": 7})
    # wrong password: refused, reported as a SubscribeError, and the publisher keeps retrying
    monkeypatch.setenv("STREAMER_MQTT_PASSWORD", "wrong")
    with pytest.raises(SubscribeError):
        async with contextlib.aclosing(
            subscribe_payloads(f"mqtts://127.0.0.1:{broker.port}", "x", reconnect=False)
        ) as stream:
            await anext(stream)
    pub = _publisher(broker, instance="denied", tls=True, close_timeout=0.2)
    async with pub:
        await asyncio.sleep(0.3)
        assert not pub.connected and pub.connects == 0


# paho-mqtt 2.2 does not close the socket when the TLS handshake fails (it is freed, not
# leaked, when the exception is dropped); only that ResourceWarning is tolerated here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_tls_rejects_an_untrusted_certificate(
    mosquitto_factory: Callable[[str], Mosquitto], tmp_path: Path
) -> None:
    config, _ = _tls_broker_config(tmp_path)
    broker = mosquitto_factory(config)
    url = f"mqtts://bot:s3cret%3A%2F%40@127.0.0.1:{broker.port}"
    with pytest.raises(SubscribeError, match="CERTIFICATE_VERIFY_FAILED"):
        async with contextlib.aclosing(subscribe_payloads(url, "x", reconnect=False)) as stream:
            await anext(stream)
    # insecure mode skips verification (for tests / private networks only)
    async with from_url(url, instance="insecure", insecure=True) as pub:
        assert isinstance(pub, MqttPublisher)
        await pub.wait_connected(TIMEOUT)
    gc.collect()


async def test_subscriber_client_survives_broker_restart(mosquitto: Mosquitto) -> None:
    got: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def consume() -> None:
        async with contextlib.aclosing(
            subscribe_payloads(mosquitto.url, SURFACE_TOPIC, backoff_max=0.2)
        ) as stream:
            async for item in stream:
                got.put_nowait(item)

    async with _publisher(mosquitto, instance="r2") as pub, asyncio.TaskGroup() as tg:
        task = tg.create_task(consume())
        await pub.publish(SURFACE_TOPIC, {"seq": 1})
        assert (await asyncio.wait_for(got.get(), TIMEOUT))[1] == {"seq": 1}
        mosquitto.stop()
        await wait_until(lambda: not pub.connected)
        await pub.publish(SURFACE_TOPIC, {"seq": 2})
        mosquitto.start()
        assert (await asyncio.wait_for(got.get(), TIMEOUT))[1] == {"seq": 2}
        task.cancel()


def test_render_views() -> None:
    surface = _surface()
    text = render(SURFACE_TOPIC, surface)
    lines = text.splitlines()
    assert lines[0].startswith(SURFACE_TOPIC) and "seq 1" in lines[0] and "ok" in lines[0]
    assert "rmse 0.42%" in lines[1] and "in_band 91%" in lines[1] and "penalty -" in lines[1]
    header = next(line for line in lines if "expiry" in line)
    assert header.split() == ["expiry", "T", "forward", "atm_iv", "rmse", "in_band", "params"]
    row = lines[-1].split()
    assert row[:6] == ["12FEB21", "0.0082", "47,812.50", "62.34%", "0.40%", "95%"]
    assert "sigma=0.1" in lines[-1]
    greeks = render(GREEKS_TOPIC, _greeks())
    assert (
        "forward 47,812.50" in greeks and "iv 62.0%" in greeks and "bid/ask iv 60.00%/-" in greeks
    )
    status = render(
        "streamer/status/x",
        {"schema": "streamer.status/1", "state": "offline", "version": "1.2", "uptime_s": None,
         "ts_ms": 0, "reason": "connection lost", "feeds": {"deribit": "up"}},
    )  # fmt: skip
    assert status == (
        "streamer/status/x  OFFLINE  v1.2  up -  at 1970-01-01 00:00:00.000 UTC"
        '  (connection lost)  feeds {"deribit":"up"}'
    )
    # anything else (and malformed known payloads) prints as JSON
    assert render("x/y", {"a": 1}) == 'x/y  {"a":1}'
    broken = {"schema": "streamer.surface/1", "expiries": "nope", "fit": {"rmse_iv": "x"}}
    assert render("x", broken).startswith("x  seq None")
    assert render(
        "x", {"schema": "streamer.greeks/1", "instruments": [{"strike": "bad"}], "forward": 1.0}
    ).startswith("x  {")


async def test_subscriber_reports_cleared_topics_instead_of_dropping_them(
    mosquitto: Mosquitto,
) -> None:
    """A retained topic cleared with an empty message (``Publisher.clear_retained``) reaches
    ``on_cleared``; it is neither yielded nor logged as a bad payload."""
    import structlog

    async with from_url(mosquitto.url + "/streamer") as pub:
        await pub.publish("streamer/x/a", {"n": 1})
        await pub.clear_retained("streamer/x/a")
        await pub.publish("streamer/x/b", {"n": 2})
        await pub.aclose()
    cleared: list[str] = []
    got: list[tuple[str, Any]] = []
    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(10 * UNIT):
            async for topic, payload in subscribe_payloads(
                mosquitto.url, "streamer/x/#", on_cleared=cleared.append
            ):
                got.append((topic, payload))
                if topic == "streamer/x/b":
                    break
    # retained: a is gone (nothing arrives for it), b is there
    assert got == [("streamer/x/b", {"n": 2})]
    assert not [e for e in logs if e["event"] == "mqtt_payload_dropped"]

    # live: a clear arriving while subscribed is reported
    async def clear_later() -> None:
        await asyncio.sleep(0.2 * UNIT)
        async with from_url(mosquitto.url + "/streamer") as p2:
            await p2.publish("streamer/x/c", {"n": 3})
            await p2.clear_retained("streamer/x/c")
            await p2.publish("streamer/x/d", {"n": 4})

    task = asyncio.create_task(clear_later())
    async with asyncio.timeout(10 * UNIT):
        async for topic, _ in subscribe_payloads(
            mosquitto.url, "streamer/x/#", on_cleared=cleared.append
        ):
            if topic == "streamer/x/d":
                break
    await task
    assert cleared == ["streamer/x/c"]


async def test_surfaces_go_out_before_queued_greeks() -> None:
    """A surface queued behind a burst of greeks is sent first (in the next batch), the
    greeks after it in the order they were queued: what a bot waits for does not wait for
    the greeks (a stand-in client records the order of the publishes)."""
    pub = MqttPublisher(host="127.0.0.1", batch=2)
    greeks = [topic_greeks("streamer", "deribit", "BTC", "svi", e) for e in ("A", "B", "C")]
    for topic in greeks:
        pub._put(topic, b"{}", True)
    pub._put(SURFACE_TOPIC, b"{}", True)
    sent: list[str] = []

    class Client:
        async def publish(self, topic: str, data: bytes, **_: Any) -> None:
            sent.append(topic)

    pub._closing.set()  # the sender returns once nothing is pending
    await pub._drain(Client())  # type: ignore[arg-type]
    assert sent == [SURFACE_TOPIC, *greeks] and pub.published == 4
