"""A real mosquitto broker for tests, on a free loopback port, that can be stopped and restarted.

``mosquitto`` (the fixture) starts ``/usr/sbin/mosquitto`` (or ``mosquitto`` on PATH) with a
generated config listening on 127.0.0.1 only, on a port chosen by binding port 0 first; it
waits until the broker accepts TCP connections and stops it at teardown. ``stop()`` /
``start()`` restart it on the same port (retained messages do not survive: persistence is off,
so whatever a subscriber sees after a restart was re-published). Tests skip with the reason if
mosquitto is not installed (``scripts/install`` apt-installs it; CI has it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
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
        self, binary: str, workdir: Path, port: int | None = None, extra_config: str = ""
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.config.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            # run as the current user: as root, mosquitto would switch to "mosquitto", which
            # cannot read files under pytest's private tmp_path
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"  # no Nagle stalls (40 ms) on small messages
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
