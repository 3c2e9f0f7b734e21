"""Subscriber library for bots: read streamer's payloads from the MQTT bus.

``subscribe_payloads(url, topic)`` yields ``(topic, payload)`` for every JSON-object message on
``topic`` (MQTT wildcards ``+`` and ``#`` allowed), retained ones first as the broker delivers
them. It subscribes with QoS 1 and, by default, reconnects with jittered backoff when the broker
goes away (retained messages are re-delivered on resubscribe, so a bot always ends up with the
latest state). Messages that are not JSON objects are logged and skipped, never fatal::

    async for topic, payload in subscribe_payloads("mqtt://127.0.0.1:1883", "streamer/#"):
        ...

The URL is ``mqtt[s]://[user:pass@]host[:port]`` (a path, if any, is ignored here: the topic is
taken as given). Credentials and TLS come as for the publisher (``streamer.publish.mqtt``):
keyword arguments or the URL, then ``STREAMER_MQTT_USERNAME`` / ``STREAMER_MQTT_PASSWORD`` (or
``..._FILE``), then the systemd credentials ``mqtt_username`` / ``mqtt_password``;
``STREAMER_MQTT_CAFILE``, ``STREAMER_MQTT_TLS_INSECURE``.

A broker that refuses us raises ``SubscribeError`` at once, with or without ``reconnect``: a
CONNACK refusal (bad username or password, not authorised), a TLS failure (untrusted
certificate, host name mismatch) or a refused subscription (the ACL does not let this user read
the topic). Retrying the same credentials cannot succeed, and a bot must not sit silently
waiting for data that will never come. Only a lost or unreachable broker is retried (logged at
warning level on each attempt) when ``reconnect`` is true.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import aiomqtt
import orjson
import structlog

from streamer.backoff import Backoff
from streamer.errors import SubscribeError
from streamer.publish.mqtt import (
    DEFAULT_BACKOFF_INITIAL_S,
    DEFAULT_BACKOFF_MAX_S,
    EXPLAIN,
    NODELAY,
    REFUSALS,
    classify_failure,
    mqtt_credentials,
)
from streamer.publish.urls import parse_mqtt_url, redact

if TYPE_CHECKING:
    from streamer.client.surface import Surface

log = structlog.get_logger(__name__)

DEFAULT_URL = "mqtt://127.0.0.1:1883"
_TRUE = {"1", "true", "yes", "on"}


def _tls_context(tls: bool, cafile: str | None, insecure: bool | None) -> ssl.SSLContext | None:
    if not tls:
        return None
    cafile = cafile if cafile is not None else os.environ.get("STREAMER_MQTT_CAFILE")
    if insecure is None:
        insecure = os.environ.get("STREAMER_MQTT_TLS_INSECURE", "").lower() in _TRUE
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise SubscribeError(f"cannot load CA file {cafile!r}: {exc}") from exc
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def subscribe_payloads(
    url: str,
    topic: str,
    *,
    reconnect: bool = True,
    username: str | None = None,
    password: str | None = None,
    cafile: str | None = None,
    insecure: bool | None = None,
    backoff_max: float = DEFAULT_BACKOFF_MAX_S,
    timeout: float = 10.0,
    on_cleared: Callable[[str], object] | None = None,
) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
    """Yield ``(topic, payload)`` for each JSON-object message on ``topic`` (QoS 1).

    An empty message is a cleared retained topic (a settled expiry's greeks, a model switched
    off): it is not yielded, ``on_cleared(topic)`` is called when given (never logged as bad).

    A refusal (credentials, authorisation, TLS, a subscription the ACL denies) always raises
    ``SubscribeError`` naming the broker; with ``reconnect=False`` so does a lost or unreachable
    broker, otherwise the iterator reconnects (capped jittered backoff) and never ends by itself.
    """
    parsed = parse_mqtt_url(url)
    creds = mqtt_credentials(
        username if username is not None else parsed.username,
        password if password is not None else parsed.password,
    )
    user, pwd = creds.username, creds.password
    broker = f"{'mqtts' if parsed.tls else 'mqtt'}://{parsed.host}:{parsed.port}"
    tls_context = _tls_context(parsed.tls, cafile, insecure)
    backoff = Backoff(DEFAULT_BACKOFF_INITIAL_S, max(backoff_max, DEFAULT_BACKOFF_INITIAL_S))
    while True:
        client = aiomqtt.Client(
            parsed.host,
            parsed.port,
            username=user,
            password=pwd,
            tls_context=tls_context,
            timeout=timeout,
            socket_options=NODELAY,
        )
        try:
            async with client:
                granted = await client.subscribe(topic, qos=1)
                if any(_code(g) >= 0x80 for g in _codes(granted)):
                    raise SubscribeError(
                        f"MQTT broker {broker} refused the subscription to {topic!r} for "
                        f"user {user!r}: not authorised (the broker's ACL)"
                    )
                log.info("mqtt_subscribed", url=redact(url), topic=topic)
                backoff.reset()
                async for message in client.messages:
                    if not message.payload:  # an empty retained message: the topic cleared
                        if on_cleared is not None:
                            on_cleared(message.topic.value)
                        continue
                    payload = _decode(message)
                    if payload is not None:
                        yield message.topic.value, payload
        except aiomqtt.MqttError as exc:
            reason = classify_failure(exc)
            if reason in REFUSALS:
                who = f"user {user!r}" if user else "no username"
                if creds.password_source:
                    who += f", password from {creds.password_source}"
                msg = f"MQTT broker {broker} {EXPLAIN[reason]} [{who}]: {exc}"
                log.error("mqtt_subscriber_refused", broker=broker, reason=reason, error=msg)
                raise SubscribeError(msg) from None
            if not reconnect:
                raise SubscribeError(f"MQTT connection to {broker} failed: {exc}") from None
            delay = backoff.next_delay()
            log.warning(
                "mqtt_subscriber_retry",
                broker=broker,
                reason=reason,
                error=str(exc),
                retry_in_s=delay,
            )
            await asyncio.sleep(delay)


def _codes(granted: Any) -> list[Any]:
    return list(granted) if isinstance(granted, list | tuple) else [granted]


def _code(granted: Any) -> int:
    """A SUBACK entry as a number (paho gives ints for MQTT 3.1.1, ReasonCodes for 5)."""
    value = getattr(granted, "value", granted)
    return int(value) if isinstance(value, int) else 0


def _decode(message: aiomqtt.Message) -> dict[str, Any] | None:
    raw = message.payload
    if not isinstance(raw, bytes | bytearray | str):
        log.warning("mqtt_payload_dropped", topic=message.topic.value, reason="not_bytes")
        return None
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        log.warning("mqtt_payload_dropped", topic=message.topic.value, reason="not_json")
        return None
    if not isinstance(payload, dict):
        log.warning("mqtt_payload_dropped", topic=message.topic.value, reason="not_object")
        return None
    return payload


async def subscribe(
    url: str,
    venue: str,
    underlying: str,
    model: str,
    *,
    prefix: str = "streamer",
    **options: Any,
) -> AsyncGenerator[Surface, None]:
    """Yield a ``Surface`` for every surface payload of (venue, underlying, model)::

        async for surface in subscribe("mqtt://127.0.0.1:1883", "deribit", "BTC", "svi"):
            iv = surface.iv(100_000, "27DEC24")
            greeks = surface.greeks([90_000, 110_000], "27DEC24", ["P", "C"])

    The surface answers IVs, prices and Greeks locally with the same numbers as the greeks
    topic. ``options`` go to ``subscribe_payloads`` (credentials, TLS, reconnect, ...).
    Payloads that do not rebuild (unknown model, missing fields) are logged and skipped.
    """
    from streamer.client.surface import Surface
    from streamer.errors import StreamerError
    from streamer.publish.payloads import topic_surface

    topic = topic_surface(prefix, venue, underlying, model)
    async for _topic, payload in subscribe_payloads(url, topic, **options):
        try:
            yield Surface.from_payload(payload)
        except (StreamerError, KeyError, TypeError, ValueError) as exc:
            log.warning("surface_payload_dropped", topic=topic, error=str(exc))
