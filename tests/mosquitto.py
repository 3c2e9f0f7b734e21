"""A real mosquitto broker for tests, on a free loopback port, that can be stopped and restarted.

``mosquitto`` (the fixture) starts ``/usr/sbin/mosquitto`` (or ``mosquitto`` on PATH) with a
generated config listening on 127.0.0.1 only, on a port chosen by binding port 0 first; it
waits until the broker accepts TCP connections and stops it at teardown. ``stop()`` /
``start()`` restart it on the same port (retained messages do not survive: persistence is off,
so whatever a subscriber sees after a restart was re-published). Tests skip with the reason if
mosquitto is not installed (``scripts/install`` apt-installs it; CI has it).

``secure_mosquitto_factory`` makes brokers the way a production one is set up: a TLS listener
only (certificates made at test time by ``trustme``: a CA, the broker's certificate for the
host names asked for, and a second CA that signed nothing here), ``allow_anonymous false``, a
password file (mosquitto's PBKDF2-SHA512 format, written here: ``password_file``) and an ACL
file (``acl_file``). The default users are the daemon (``streamer``: read and write under
``streamer/#``, which holds its status topic) and a bot (``bot``: read only).
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 10.0


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    return shutil.which("mosquitto")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """One mosquitto process on ``127.0.0.1:port``; ``start``/``stop``/``kill`` it at will."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        port: int | None = None,
        extra_config: str = "",
        *,
        anonymous: bool = True,
        persistence: bool = False,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        store = f"persistence true\npersistence_location {workdir}/\n" if persistence else ""
        self.config.write_text(
            f"listener {self.port} {self.host}\n"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            # run as the current user: as root, mosquitto would switch to "mosquitto", which
            # cannot read files under pytest's private tmp_path
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            + (store or "persistence false\n")
            + "set_tcp_nodelay true\n"  # no Nagle stalls (40 ms) on small messages
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
            "log_type notice\n" + extra_config
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.running:
            return
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode} on port {self.port}: "
                    f"{self.log.read_text(errors='replace')[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not listen on port {self.port}") from None
                time.sleep(0.01)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Kill the broker hard (SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): sockets stay open, nothing is answered (a hung host)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused broker run again (SIGCONT)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[[str], Mosquitto]]:
    """Make (started) brokers with extra config lines for the listener (TLS, passwords)."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (scripts/install apt-installs it)")
    brokers: list[Mosquitto] = []

    def make(extra_config: str) -> Mosquitto:
        workdir = tmp_path / f"broker{len(brokers)}"
        workdir.mkdir()
        broker = Mosquitto(binary, workdir, extra_config=extra_config)
        brokers.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in brokers:
            broker.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto on a free 127.0.0.1 port, stopped at teardown."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (scripts/install apt-installs it)")
    broker = Mosquitto(binary, tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# --------------------------------------------------------------------------- TLS + auth + ACL

DAEMON_USER = "streamer"
BOT_USER = "bot"
DEFAULT_ACL = """\
# the daemon writes under its prefix only (its status topic is streamer/status/<instance>)
user streamer
topic readwrite streamer/#
# a trading bot reads, never writes
user bot
topic read streamer/#
"""


def password_line(user: str, password: str, *, iterations: int = 101) -> str:
    """A mosquitto 2.x password file line: ``user:$7$iterations$salt$hash`` with PBKDF2-HMAC-
    SHA512 (what ``mosquitto_passwd`` writes; mosquitto's src/password_mosq.c)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"{user}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


@dataclass
class SecureBroker:
    """A running TLS + password + ACL mosquitto and what a client needs to talk to it."""

    broker: Mosquitto
    cafile: Path  # the CA that signed the broker's certificate
    untrusted_cafile: Path  # a CA that did not
    passwords: dict[str, str]  # user -> password

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        """``mqtts://127.0.0.1:PORT`` (no user: give it as you mean to)."""
        return f"mqtts://{self.broker.host}:{self.broker.port}"

    def client_env(self, user: str = DAEMON_USER, password: str | None = None) -> dict[str, str]:
        """Environment for streamer's own clients: user, password, the CA file."""
        return {
            "STREAMER_MQTT_USERNAME": user,
            "STREAMER_MQTT_PASSWORD": self.passwords[user] if password is None else password,
            "STREAMER_MQTT_CAFILE": str(self.cafile),
        }


def make_secure_broker(
    binary: str,
    workdir: Path,
    *,
    users: Mapping[str, str] | None = None,
    acl: str = DEFAULT_ACL,
    cert_hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    persistence: bool = False,
) -> SecureBroker:
    """Write certificates, a password file and an ACL into ``workdir``; start the broker."""
    import trustme

    workdir.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert(*cert_hosts)
    cafile, other_cafile = workdir / "ca.pem", workdir / "untrusted-ca.pem"
    certfile, keyfile = workdir / "server.pem", workdir / "server.key"
    ca.cert_pem.write_to_path(str(cafile))
    other.cert_pem.write_to_path(str(other_cafile))
    server.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    server.private_key_pem.write_to_path(str(keyfile))
    passwords = (
        dict(users)
        if users is not None
        else {
            DAEMON_USER: "daemon-" + secrets.token_urlsafe(12),
            BOT_USER: "bot-" + secrets.token_urlsafe(12),
        }
    )
    passwd, acl_file = workdir / "passwd", workdir / "acl"
    passwd.write_text("".join(password_line(u, p) + "\n" for u, p in passwords.items()))
    acl_file.write_text(acl)
    for path in (keyfile, passwd, acl_file):
        path.chmod(0o600)
    broker = Mosquitto(
        binary,
        workdir,
        anonymous=False,
        persistence=persistence,
        extra_config=(
            f"certfile {certfile}\nkeyfile {keyfile}\npassword_file {passwd}\nacl_file {acl_file}\n"
        ),
    )
    broker.start()
    return SecureBroker(broker, cafile, other_cafile, passwords)


@pytest.fixture
def secure_mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., SecureBroker]]:
    """Make started TLS + password + ACL brokers (``make_secure_broker``'s keywords)."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (scripts/install apt-installs it)")
    pytest.importorskip("trustme", reason="trustme (a dev dependency) makes the certificates")
    made: list[SecureBroker] = []

    def make(**kwargs: object) -> SecureBroker:
        sb = make_secure_broker(binary, tmp_path / f"secure{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(sb)
        return sb

    try:
        yield make
    finally:
        for sb in made:
            sb.broker.stop()


@pytest.fixture
def secure_mosquitto(secure_mosquitto_factory: Callable[..., SecureBroker]) -> SecureBroker:
    """A running TLS + password + ACL mosquitto on a free 127.0.0.1 port."""
    return secure_mosquitto_factory()
