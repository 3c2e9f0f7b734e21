"""MQTT publisher (aiomqtt 2.x): retained QoS 1 messages, status topic, latest-wins buffering.

Behaviour (DESIGN section 4):

- Every message is published with QoS 1 and, by default, retained.
- ``{prefix}/status/{instance}`` is retained: ``online`` (version, uptime, feed states) right
  after each connect, ``offline`` as the MQTT last will (the broker sends it if the connection
  dies, e.g. the process is killed) and on clean shutdown (``aclose``).
- ``publish()`` never waits for the network: it stores the encoded payload in a pending table
  ``topic -> payload`` and wakes the one background sender task. A newer message for a topic
  that is still pending replaces the older one (counted in ``superseded``), so while the broker
  is away memory stays bounded by the number of topics and, on reconnect, the latest message of
  every topic is delivered. Surfaces and greeks are state, not events: latest wins.
- Lost connection: reconnect with capped, jittered exponential backoff (reset after a
  successful connect), in the spirit of python-websockets' ``connect`` iterator.
- Retained state survives a broker that lost it: the latest acknowledged (PUBACK) retained
  payload of every topic is kept (``topic -> payload``, one per topic; a cleared topic leaves
  it) and re-queued on every reconnect behind anything newer, so a broker restarted without
  persistence holds every surface and greeks topic again (counted in ``restored``; a
  subscriber may see a payload twice, with the same ``seq``). Memory: at most one pending and
  one acknowledged payload per live topic. ``on_ack(topic, payload)``, when set, is called for
  every PUBACK (the fault tests' record of what the broker acknowledged).
- ``retained_topics(filter)`` lists the retained topics under a filter on a second, short
  connection (the daemon clears the topics of models it no longer runs).
- The publisher owns an ``asyncio.TaskGroup`` (entered by ``start``/``__aenter__``, left by
  ``aclose``) holding its single background task, like aiomqtt's client owns its tasks.

- A broker that refuses us is an error, not a quiet retry: a CONNACK refusal (bad username
  or password, not authorised; MQTT 3.1.1 section 3.2.2.3) or a TLS failure (untrusted
  certificate, host name mismatch) is logged at error level on every attempt
  (``mqtt_connect_refused``, with the broker's URL, redacted, the user, where the password came
  from, and a ``reason``), kept in ``stats()`` (``reason``, ``error``, ``failures`` per
  reason) for the daemon's metrics and status, and retried with the same backoff (the broker
  side may be fixed while we wait). ``check_broker`` lets a one-shot command (``streamer
  replay``) fail at once instead, and ``undelivered_error`` after ``aclose`` says what was lost.

Credentials (``mqtt_credentials``), first found wins: the keyword arguments (from the URL of a
config file: ``mqtt://user:password@host``), then ``STREAMER_MQTT_USERNAME`` /
``STREAMER_MQTT_PASSWORD`` or the files named by ``STREAMER_MQTT_USERNAME_FILE`` /
``STREAMER_MQTT_PASSWORD_FILE``, then the systemd credentials ``mqtt_username`` /
``mqtt_password`` in ``$CREDENTIALS_DIRECTORY`` (``streamer.settings.read_secret``). TLS:
``STREAMER_MQTT_CAFILE`` (a CA bundle; else the system's), ``STREAMER_MQTT_TLS_INSECURE``
(``1`` disables certificate checks; for testing only).

References: MQTT Version 3.1.1, OASIS Standard (2014), sections 3.1.2.5 (Will flag),
3.3.1.3 (RETAIN), 4.3.2 (QoS 1 delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError

from streamer import __version__
from streamer.backoff import Backoff
from streamer.errors import InputError, PublishError
from streamer.publish.base import DEFAULT_INSTANCE, DEFAULT_PREFIX, Publisher, encode
from streamer.publish.payloads import STATUS_SCHEMA, topic_status
from streamer.settings import read_secret

log = structlog.get_logger(__name__)

DEFAULT_KEEPALIVE_S = 30
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_BACKOFF_INITIAL_S = 0.1
DEFAULT_BACKOFF_MAX_S = 10.0
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_CLOSE_TIMEOUT_S = 3.0
DEFAULT_BATCH = 16  # in flight at once (paho queues beyond its own 20)

# small messages must not wait for Nagle's algorithm (a 40 ms stall with delayed ACKs)
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
_TRUE = {"1", "true", "yes", "on"}


# why a connection attempt failed; the first five are refusals: retrying cannot help until
# someone changes the credentials, the broker's password file / ACL, or the certificates
REFUSALS = ("not_authorized", "bad_credentials", "tls_untrusted", "tls_hostname", "tls_error")
TRANSIENT = ("unreachable", "unavailable", "timeout", "connection_lost", "protocol")
# CONNACK return codes (MQTT 3.1.1 table 3.1) and the MQTT 5 reason codes paho maps them to
_CONNACK_REASONS = {4: "bad_credentials", 134: "bad_credentials", 5: "not_authorized",
                    135: "not_authorized", 3: "unavailable", 136: "unavailable"}  # fmt: skip
_HOSTNAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
EXPLAIN = {
    "not_authorized": "refused the connection: not authorised (a wrong username or password, "
    "or a user the broker does not let in)",
    "bad_credentials": "refused the connection: bad username or password",
    "tls_untrusted": "TLS: the broker's certificate is not trusted (set STREAMER_MQTT_CAFILE "
    "to the CA that signed it)",
    "tls_hostname": "TLS: the broker's certificate is not valid for this host name",
    "tls_error": "TLS handshake failed",
}


@dataclass(frozen=True, slots=True)
class MqttStats:
    """Counters for metrics: a snapshot of the publisher's state."""

    connected: bool
    published: int
    superseded: int
    dropped: int
    failed: int
    connects: int
    reconnects: int
    pending: int
    broker: str = ""  # mqtt[s]://host:port (never credentials)
    reason: str | None = None  # why the last attempt failed (REFUSALS, TRANSIENT); None: fine
    error: str | None = None  # the last failure, for people
    failures: dict[str, int] = field(default_factory=dict)  # failed attempts by reason


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password and where each came from (for messages; never the value)."""

    username: str | None
    password: str | None = field(repr=False)
    username_source: str | None = None
    password_source: str | None = None


def mqtt_credentials(
    username: str | None = None, password: str | None = None, *, source: str = "the URL"
) -> Credentials:
    """``username``/``password`` as given (``source`` says where from), else the environment,
    a file or a systemd credential (``streamer.settings.read_secret``: ``mqtt_username``,
    ``mqtt_password``). Raises ``ConfigError`` for an unreadable secret file."""
    user_src = source if username is not None else None
    pass_src = source if password is not None else None
    if username is None and (found := read_secret("mqtt_username")) is not None:
        username, user_src = found
    if password is None and (found := read_secret("mqtt_password")) is not None:
        password, pass_src = found
    return Credentials(username, password, user_src, pass_src)


def classify_failure(exc: BaseException) -> str:
    """A reason (``REFUSALS`` or ``TRANSIENT``) for an exception from connecting/publishing."""
    rc = getattr(exc, "rc", None)
    if isinstance(exc, MqttConnectError) and rc is not None:
        return _CONNACK_REASONS.get(int(getattr(rc, "value", rc)), "protocol")
    # aiomqtt turns socket and TLS errors into MqttError(str(exc)) from None: the original is
    # still the context
    cause: BaseException | None = exc
    for _ in range(3):
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            verify = getattr(cause, "verify_code", None)
            text = str(cause).lower()
            if verify in _HOSTNAME_MISMATCH or "mismatch" in text:
                return "tls_hostname"
            return "tls_untrusted"
        if isinstance(cause, ssl.SSLError):
            return "tls_error"
        if isinstance(cause, TimeoutError):
            return "timeout"
        if isinstance(cause, OSError):
            return "unreachable"
        cause = cause.__cause__ or cause.__context__
    text = str(exc).lower()
    if "certificate verify failed" in text:
        return "tls_hostname" if "mismatch" in text else "tls_untrusted"
    if "ssl" in text or "tls" in text:
        return "tls_error"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    return "connection_lost" if isinstance(exc, aiomqtt.MqttCodeError) else "unreachable"


def check_topic(topic: str) -> None:
    """Raise InputError unless ``topic`` is a valid MQTT topic name to publish on."""
    if not topic or any(c in topic for c in "+#\x00") or len(topic.encode()) > 65535:
        raise InputError("topic", f"not a valid MQTT topic name to publish on: {topic!r}")


class MqttPublisher(Publisher):
    """Publishes to an MQTT broker; see the module docstring for the delivery rules.

    Args:
        host, port: the broker.
        prefix: topic prefix (topics are built by the caller with it; status uses it too).
        instance: names the status topic ``{prefix}/status/{instance}``.
        username, password: credentials (default: ``mqtt_credentials``: environment, file,
            systemd credential).
        tls: connect with TLS (``mqtts://``).
        cafile: CA bundle for TLS (default: env STREAMER_MQTT_CAFILE, else system CAs).
        insecure: skip TLS certificate and host name checks (env STREAMER_MQTT_TLS_INSECURE=1).
        client_id: MQTT client identifier (default: random, chosen by the client library).
        keepalive: MQTT keepalive in seconds (dead broker detection).
        timeout: seconds to wait for CONNACK / PUBACK before treating the connection as lost.
        backoff_initial, backoff_max, backoff_factor: reconnect delays (jittered).
        close_timeout: ``aclose`` waits this long to flush pending messages and say offline.
        batch: at most this many messages in flight (QoS 1) at once.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int = 1883,
        prefix: str = DEFAULT_PREFIX,
        instance: str = DEFAULT_INSTANCE,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        cafile: str | None = None,
        insecure: bool | None = None,
        client_id: str | None = None,
        keepalive: int = DEFAULT_KEEPALIVE_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_max: float = DEFAULT_BACKOFF_MAX_S,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        env = os.environ
        self.host = host
        self.port = port
        self.prefix = prefix
        self.instance = instance
        self.status_topic = topic_status(prefix, instance)
        self.broker = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        creds = mqtt_credentials(username, password)
        self._username, self._password = creds.username, creds.password
        self._password_source = creds.password_source
        self._tls = tls
        self._cafile = cafile if cafile is not None else env.get("STREAMER_MQTT_CAFILE")
        if insecure is None:
            insecure = env.get("STREAMER_MQTT_TLS_INSECURE", "").lower() in _TRUE
        self._insecure = insecure
        self._client_id = client_id
        self._keepalive = keepalive
        self._timeout = timeout
        self._backoff = (backoff_initial, backoff_max, backoff_factor)
        self._close_timeout = close_timeout
        self._batch = max(1, batch)

        self._pending: dict[str, tuple[bytes, bool]] = {}
        self._acked: dict[str, bytes] = {}  # latest acknowledged retained payload per topic
        self.on_ack: Callable[[str, bytes], None] | None = None
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._started_ms = int(time.time() * 1000)
        self._started_mono = time.monotonic()
        self._feeds: dict[str, Any] = {}
        self._brokers: dict[str, Any] = {}
        self._attempted = asyncio.Event()  # set once a connection attempt has concluded
        self.reason: str | None = None  # why the last attempt failed (None: connected / fine)
        self.last_error: str | None = None
        self.failures: dict[str, int] = {}

        self.connected = False
        self.published = 0
        self.superseded = 0
        self.dropped = 0
        self.failed = 0
        self.connects = 0
        self.reconnects = 0
        self.restored = 0  # acknowledged retained payloads re-sent after a reconnect
        self.offline_reason = "shutdown"  # the clean close's offline status says this

    # -- public API ----------------------------------------------------------------------

    def __repr__(self) -> str:
        scheme = "mqtts" if self._tls else "mqtt"
        return f"MqttPublisher({scheme}://{self.host}:{self.port}/{self.prefix})"

    async def start(self) -> None:
        """Enter the publisher's TaskGroup and start the sender; returns without waiting for
        the broker (messages are buffered until it is reachable)."""
        if self._tg is not None:
            raise PublishError(f"{self!r} already started")
        if self._closed:
            raise PublishError(f"{self!r} is closed")
        self._tls_context()  # fail early on a bad CA file
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        self._task = tg.create_task(self._run(), name=f"mqtt-publisher {self.status_topic}")

    def _accepting(self, topic: str) -> None:
        """Raise unless a message for ``topic`` can be queued: started, not closed, a valid
        topic name."""
        if self._closed or self._closing.is_set():
            raise PublishError(f"{self!r} is closed")
        if self._tg is None:
            raise PublishError(f"{self!r} not started: use 'async with' or await start()")
        check_topic(topic)

    async def publish(self, topic: str, payload: Mapping[str, Any], *, retain: bool = True) -> None:
        """Queue ``payload`` for ``topic`` (latest wins per topic); returns immediately."""
        self._accepting(topic)
        self._put(topic, encode(payload), retain)

    async def publish_encoded(self, topic: str, data: bytes, *, retain: bool = True) -> None:
        """Queue a payload already encoded (``encode``'s bytes) for ``topic``."""
        self._accepting(topic)
        self._put(topic, bytes(data), retain)

    async def clear_retained(self, topic: str) -> None:
        """Queue an empty retained message for ``topic`` (the broker drops its retained one)."""
        self._accepting(topic)
        self._put(topic, b"", True)

    def set_feed_state(self, name: str, state: Any) -> None:
        """Record a feed's state (any JSON value) and republish the ``online`` status."""
        self._feeds[name] = state
        if self._tg is not None and not self._closing.is_set():
            self._put(self.status_topic, self._status_payload("online"), True)

    @property
    def feed_states(self) -> dict[str, Any]:
        return dict(self._feeds)

    def stats(self) -> MqttStats:
        return MqttStats(
            connected=self.connected,
            published=self.published,
            superseded=self.superseded,
            dropped=self.dropped,
            failed=self.failed,
            connects=self.connects,
            reconnects=self.reconnects,
            pending=len(self._pending),
            broker=self.broker,
            reason=self.reason,
            error=self.last_error,
            failures=dict(self.failures),
        )

    @property
    def pending(self) -> int:
        """Messages waiting for the broker (at most one per topic)."""
        return len(self._pending)

    @property
    def refused(self) -> bool:
        """True while the broker refuses us (credentials, authorisation, TLS)."""
        return self.reason in REFUSALS

    async def check_broker(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for the first connection attempt to conclude: True if
        connected, False if the broker is not reachable (yet: messages stay buffered). A
        refusal (``REFUSALS``) raises ``PublishError`` naming the broker and the reason."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._attempted.wait()
        if self.refused:
            raise PublishError(self.last_error or f"{self.broker}: {self.reason}")
        return self.connected

    def undelivered_error(self) -> PublishError | None:
        """After ``aclose``: a ``PublishError`` if messages were dropped undelivered (naming
        the broker and the last failure), else None."""
        if not self.dropped:
            return None
        why = self.last_error or "broker not reachable"
        return PublishError(f"{self.dropped} message(s) not delivered to {self.broker}: {why}")

    def set_broker_states(self, brokers: Mapping[str, Any]) -> None:
        """The state of every broker the daemon publishes to (``{url: {...}}``), shown in the
        status topic so that a refusal by one broker is seen on the others; republishes the
        status when it changed."""
        if dict(brokers) == self._brokers:
            return
        self._brokers = dict(brokers)
        if self._tg is not None and not self._closing.is_set():
            self._put(self.status_topic, self._status_payload("online"), True)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the publisher is connected (and has announced ``online``)."""
        async with asyncio.timeout(timeout):
            await self._connected_event.wait()

    async def wait_sent(self, timeout: float) -> None:
        """Until nothing is pending or in flight (acknowledged), at most ``timeout`` s; at
        once while disconnected (the messages wait for the broker, not the caller)."""
        if not self.connected or self._idle.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until nothing is pending (or raise TimeoutError)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def aclose(self) -> None:
        """Flush pending messages (up to ``close_timeout``), publish ``offline``, disconnect."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake.set()
        tg, task = self._tg, self._task
        if tg is None or task is None:
            return
        try:
            async with asyncio.timeout(self._close_timeout):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning("mqtt_close_timeout", topic=self.status_topic, pending=len(self._pending))
            task.cancel()
        finally:
            self.dropped += len(self._pending)
            self._pending.clear()
            await tg.__aexit__(None, None, None)
            self.connected = False

    # -- internals -----------------------------------------------------------------------

    def _put(self, topic: str, data: bytes, retain: bool) -> None:
        if self._pending.pop(topic, None) is not None:
            self.superseded += 1
        self._pending[topic] = (data, retain)
        self._idle.clear()
        self._wake.set()

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
        uptime = round(time.monotonic() - self._started_mono, 3) if state == "online" else None
        return encode(
            {
                "schema": STATUS_SCHEMA,
                "instance": self.instance,
                "state": state,
                "version": __version__,
                "ts_ms": int(time.time() * 1000),
                "started_ms": self._started_ms,
                "uptime_s": uptime,
                "feeds": self._feeds,
                "reason": reason,
                **({"brokers": self._brokers} if self._brokers else {}),
            }
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self._tls:
            return None
        try:
            ctx = ssl.create_default_context(cafile=self._cafile)
        except (OSError, ssl.SSLError) as exc:
            raise PublishError(f"cannot load CA file {self._cafile!r}: {exc}") from exc
        if self._insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _client(self) -> aiomqtt.Client:
        will = aiomqtt.Will(
            self.status_topic,
            self._status_payload("offline", "connection lost"),
            qos=1,
            retain=True,
        )
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self._username,
            password=self._password,
            identifier=self._client_id,
            will=will,
            keepalive=self._keepalive,
            timeout=self._timeout,
            tls_context=self._tls_context(),
            socket_options=NODELAY,
        )
        # we keep up to `batch` QoS 1 publishes in flight on purpose; don't warn about it
        client.pending_calls_threshold = self._batch + 2
        return client

    async def _run(self) -> None:
        initial, maximum, factor = self._backoff
        backoff = Backoff(initial, maximum, factor)
        # one attempt at least, even when closed at once: what was published is delivered
        # (within close_timeout), not dropped unseen
        first = True
        while first or not self._closing.is_set():
            first = False
            try:
                async with self._client() as client:
                    self._on_connect()
                    backoff.reset()
                    await self._session(client)
                    # clean shutdown: say offline before DISCONNECT (which cancels the will)
                    await client.publish(
                        self.status_topic,
                        self._status_payload("offline", self.offline_reason),
                        qos=1,
                        retain=True,
                        timeout=self._timeout,
                    )
                log.info("mqtt_closed", topic=self.status_topic, published=self.published)
                return
            except* (aiomqtt.MqttError, OSError) as group:
                was_connected = self.connected
                self._on_disconnect()
                delay = backoff.next_delay()
                self._on_failure(group.exceptions[0], was_connected, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()

    def _on_failure(self, exc: BaseException, was_connected: bool, delay: float) -> None:
        reason = "connection_lost" if was_connected else classify_failure(exc)
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.reason = reason
        detail = str(exc)
        if reason in REFUSALS:
            who = f"user {self._username!r}" if self._username else "no username"
            if self._password_source:
                who += f", password from {self._password_source}"
            elif reason in ("not_authorized", "bad_credentials"):
                who += ", no password (STREAMER_MQTT_PASSWORD / _FILE / systemd credential)"
            self.last_error = f"MQTT broker {self.broker} {EXPLAIN[reason]} [{who}]: {detail}"
            log.error(
                "mqtt_connect_refused",
                broker=self.broker,
                reason=reason,
                error=self.last_error,
                retry_in_s=round(delay, 3),
                pending=len(self._pending),
            )
        else:
            self.last_error = f"MQTT broker {self.broker}: {reason}: {detail}"
            log.warning(
                "mqtt_disconnected" if was_connected else "mqtt_connect_failed",
                broker=self.broker,
                reason=reason,
                error=detail,
                retry_in_s=round(delay, 3),
                pending=len(self._pending),
            )
        self._attempted.set()

    def _on_connect(self) -> None:
        self.reason = None
        self.last_error = None
        self._attempted.set()
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.connected = True
        log.info("mqtt_connected", broker=self.broker, connects=self.connects)
        # "online" goes out first, ahead of anything that waited for the broker, then what
        # waited, then the retained state the broker may have lost (a restart without
        # persistence), for every topic with nothing newer pending
        self._pending.pop(self.status_topic, None)
        restore = {t: (d, True) for t, d in self._acked.items() if t not in self._pending}
        restore.pop(self.status_topic, None)
        self.restored += len(restore)
        self._pending = {
            self.status_topic: (self._status_payload("online"), True),
            **self._pending,
            **restore,
        }
        self._idle.clear()
        self._wake.set()

    def _on_disconnect(self) -> None:
        self.connected = False
        self._connected_event.clear()

    async def _session(self, client: aiomqtt.Client) -> None:
        """Send pending messages until closing; raises MqttError when the connection drops."""
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(self._watch(client), name="mqtt-watch")
            await self._drain(client)
            watcher.cancel()

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        # The message iterator raises MqttError as soon as the connection is lost, which
        # cancels the sender through the TaskGroup (we subscribe to nothing).
        async for _ in client.messages:
            pass

    def _next_topic(self) -> str:
        """The pending topic to send next: the status and surfaces first (what a bot waits
        for does not queue behind a burst of greeks), else the oldest queued."""
        status = self.status_topic
        for topic in self._pending:
            if topic == status or topic.endswith("/surface"):
                return topic
        return next(iter(self._pending))

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Send pending messages, at most ``batch`` in flight (QoS 1) at a time, as a sliding
        window: each acknowledgement frees a slot at once, so a surface queued behind greeks
        goes out with the next free slot, not after the whole earlier batch is acknowledged.
        Raises the connection's error (what was in flight is queued again)."""
        inflight: dict[asyncio.Future[Any], tuple[str, bytes, bool]] = {}
        try:
            while True:
                self._wake.clear()
                while self._pending and len(inflight) < self._batch:
                    topic = self._next_topic()
                    data, retain = self._pending.pop(topic)
                    sending: asyncio.Future[Any] = asyncio.ensure_future(
                        client.publish(topic, data, qos=1, retain=retain, timeout=self._timeout)
                    )
                    inflight[sending] = (topic, data, retain)
                self._inflight = len(inflight)
                if not inflight:
                    self._idle.set()
                    if self._closing.is_set():
                        return
                    await self._wake.wait()
                    continue
                woken: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
                try:
                    done, _ = await asyncio.wait(
                        [*inflight, woken], return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    woken.cancel()
                error: BaseException | None = None
                lost: list[tuple[str, bytes, bool]] = []
                for fut in done:
                    item = inflight.pop(fut, None)
                    if item is None:
                        continue  # the wake-up
                    exc = (
                        aiomqtt.MqttError("publish cancelled")
                        if fut.cancelled()
                        else fut.exception()
                    )
                    if exc is None:
                        self.published += 1
                        self._on_ack(*item)
                        if item[0] == self.status_topic:
                            self._connected_event.set()
                    elif isinstance(exc, aiomqtt.MqttError | OSError):
                        lost.append(item)
                        error = error or exc
                    else:  # the message itself is bad: drop it, count it, carry on
                        self.failed += 1
                        log.error("mqtt_publish_failed", topic=item[0], error=repr(exc))
                if error is not None:  # the connection is gone: everything in flight too
                    for fut, item in inflight.items():
                        fut.cancel()
                        lost.append(item)
                    inflight.clear()
                    self._requeue(lost)
                    raise error
        except asyncio.CancelledError:
            for fut in inflight:
                fut.cancel()
            self._requeue(list(inflight.values()))
            raise
        finally:
            self._inflight = 0

    def _on_ack(self, topic: str, data: bytes, retain: bool) -> None:
        """A PUBACK: the broker holds ``data`` for ``topic`` (retained: kept for restores;
        an empty payload cleared the topic)."""
        if retain and topic != self.status_topic:
            if data:
                self._acked[topic] = data
            else:
                self._acked.pop(topic, None)
        if self.on_ack is not None:
            self.on_ack(topic, data)

    async def retained_topics(self, topic_filter: str, *, timeout: float = 5.0) -> set[str]:
        """The topics under ``topic_filter`` that hold a retained message now, read on a
        second short connection (same credentials and TLS, no will). The end of the retained
        burst is found with a marker: after SUBACK we publish a non-retained message to a
        topic of our own under the filter's subscription set, and the broker delivers it after
        the retained messages it queued on subscribe. ``PublishError`` if that cannot be done
        within ``timeout``."""
        marker = f"{self.status_topic}/sync-{os.getpid()}-{time.monotonic_ns()}"
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self._username,
            password=self._password,
            keepalive=self._keepalive,
            timeout=self._timeout,
            tls_context=self._tls_context(),
            socket_options=NODELAY,
        )
        found: set[str] = set()
        try:
            async with asyncio.timeout(timeout), client:
                await client.subscribe([(topic_filter, 1), (marker, 1)])
                await client.publish(marker, b"sync", qos=1, retain=False)
                async for msg in client.messages:
                    topic = msg.topic.value
                    if topic == marker:
                        break
                    if msg.retain and msg.payload:
                        found.add(topic)
        except (TimeoutError, aiomqtt.MqttError, OSError) as exc:
            raise PublishError(
                f"{self.broker}: cannot list retained {topic_filter}: {exc}"
            ) from exc
        return found

    def _requeue(self, items: list[tuple[str, bytes, bool]]) -> None:
        """Put undelivered messages back unless a newer one for the topic is already waiting."""
        older: dict[str, tuple[bytes, bool]] = {}
        for topic, data, retain in items:
            if topic in self._pending:
                self.superseded += 1
            else:
                older[topic] = (data, retain)
        if older:
            self._pending = {**older, **self._pending}
