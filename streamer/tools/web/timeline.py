"""A replay's output as a timeline: the page's state at any surface of any key.

``streamer replay ... --out OUT.jsonl`` writes every published message as a line
``{"topic": ..., "payload": {...}}`` (``"payload": null`` for a cleared topic). ``Timeline``
reads such a file once and keeps, per topic, where each of its messages sits (line number,
byte offset and length: 24 bytes a message), plus the history rows of every surface and
tenors message (``streamer.tools.web.state``). Payloads are read back from the file when a
step is shown, so a replay of hundreds of megabytes (greeks for every instrument) is served
without being held in memory. Compressed files (``.gz``, ``.zst``) are decompressed to a
temporary file first (removed by ``close``).

A key's steps are its surfaces, in file order. The state at step ``i`` is the latest message
of every topic before the key's next surface (so the greeks published right after surface
``i`` belong to it).
"""

from __future__ import annotations

import bisect
import contextlib
import gzip
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
import structlog

from streamer.tools.web.state import (
    FitRow,
    Key,
    Payload,
    TenorRow,
    ViewInputs,
    _Interner,
    fit_row,
    key_name,
    live_greeks,
    shard_json,
    tenor_row,
)

log = structlog.get_logger(__name__)

_TOPIC_HEAD = b'{"topic":"'
_NULL_TAIL = b'"payload":null}'


@dataclass
class _Track:
    """Where one topic's messages sit in the file."""

    lines: array[int] = field(default_factory=lambda: array("q"))
    offsets: array[int] = field(default_factory=lambda: array("q"))
    lengths: array[int] = field(default_factory=lambda: array("q"))

    def add(self, line: int, offset: int, length: int) -> None:
        self.lines.append(line)
        self.offsets.append(offset)
        self.lengths.append(length)

    def before(self, line: int) -> int:
        """Index of the last message before ``line``, or -1."""
        return bisect.bisect_left(self.lines, line) - 1


@dataclass
class _KeyTrack:
    surface: _Track = field(default_factory=_Track)
    tenors: _Track = field(default_factory=_Track)
    greeks: dict[str, _Track] = field(default_factory=dict)
    fits: list[FitRow] = field(default_factory=list)
    tenor_rows: list[TenorRow] = field(default_factory=list)
    interner: _Interner = field(default_factory=_Interner)


def _topic_of(line: bytes) -> str | None:
    """The topic of a ``{"topic":"...","payload":...}`` line without parsing the payload
    (the jsonl publisher writes the topic first); None otherwise."""
    if line.startswith(_TOPIC_HEAD):
        end = line.find(b'"', len(_TOPIC_HEAD))
        if end > 0 and line[end - 1 : end] != b"\\":
            return line[len(_TOPIC_HEAD) : end].decode("utf-8", "replace")
    try:
        msg = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    topic = msg.get("topic") if isinstance(msg, dict) else None
    return topic if isinstance(topic, str) else None


def _plain_copy(path: str) -> tuple[str, bool]:
    """``path`` itself, or a decompressed temporary copy (True: remove it when done)."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        opener: Any = gzip.open
    elif magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        def opener(p: str, mode: str) -> IO[bytes]:
            return zstandard.open(p, mode)  # type: ignore[no-any-return]
    else:
        return path, False
    fd, tmp = tempfile.mkstemp(prefix="streamer-web-", suffix=".jsonl")
    with os.fdopen(fd, "wb") as out, opener(path, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
    return tmp, True


class Timeline:
    """The steps of every key of one replay output file (module docstring)."""

    def __init__(self, path: str | os.PathLike[str], prefix: str | None = None) -> None:
        self.path = os.fspath(path)
        self._plain, self._temporary = _plain_copy(self.path)
        self._fh: IO[bytes] = open(self._plain, "rb")  # noqa: SIM115 - closed by close()
        self.prefix = prefix
        self.keys: dict[Key, _KeyTrack] = {}
        self.status: dict[str, _Track] = {}
        self.lines = 0
        self.bad_lines = 0
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        if self._temporary:
            with contextlib.suppress(OSError):
                os.unlink(self._plain)
            self._temporary = False

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- indexing ------------------------------------------------------------------------

    def _index(self) -> None:
        offset = 0
        fh = self._fh
        for line_no, line in enumerate(iter(fh.readline, b"")):
            length = len(line)
            here, offset = offset, offset + length
            self.lines = line_no + 1
            body = line.rstrip(b"\r\n")
            if not body.strip():
                continue
            topic = _topic_of(body)
            if topic is None:
                self._bad(line_no, "not a {topic, payload} line")
                continue
            if self.prefix is None:
                self.prefix = topic.split("/", 1)[0]
            if not topic.startswith(self.prefix + "/"):
                continue
            parts = topic[len(self.prefix) + 1 :].split("/")
            if len(parts) == 2 and parts[0] == "status":
                self.status.setdefault(parts[1], _Track()).add(line_no, here, length)
                continue
            if len(parts) not in (4, 5) or not all(parts):
                continue
            key: Key = (parts[0], parts[1], parts[2])
            kind = parts[3]
            if kind == "greeks" and len(parts) == 5:
                kt = self.keys.setdefault(key, _KeyTrack())
                kt.greeks.setdefault(parts[4], _Track()).add(line_no, here, length)
            elif kind in ("surface", "tenors") and len(parts) == 4:
                if body.endswith(_NULL_TAIL):
                    continue
                payload = self._payload(body)
                if payload is None:
                    self._bad(line_no, "payload is not an object")
                    continue
                kt = self.keys.setdefault(key, _KeyTrack())
                try:
                    if kind == "surface":
                        kt.fits.append(fit_row(len(kt.fits) + 1, payload, kt.interner))
                        kt.surface.add(line_no, here, length)
                    else:
                        kt.tenor_rows.append(
                            tenor_row(len(kt.tenor_rows) + 1, payload, kt.interner)
                        )
                        kt.tenors.add(line_no, here, length)
                except (KeyError, TypeError, ValueError) as exc:
                    self._bad(line_no, f"malformed {kind}: {exc!r}")
        self.keys = {k: v for k, v in self.keys.items() if v.fits}
        log.info(
            "web_timeline_indexed",
            path=self.path,
            lines=self.lines,
            keys=[key_name(k) for k in self.keys],
            bad_lines=self.bad_lines,
        )

    def _bad(self, line_no: int, reason: str) -> None:
        self.bad_lines += 1
        if self.bad_lines <= 5:
            log.warning("web_timeline_bad_line", path=self.path, line=line_no + 1, reason=reason)

    @staticmethod
    def _payload(body: bytes) -> Payload | None:
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        payload = msg.get("payload") if isinstance(msg, dict) else None
        return payload if isinstance(payload, dict) else None

    def _read(self, track: _Track, i: int) -> Payload | None:
        self._fh.seek(track.offsets[i])
        return self._payload(self._fh.read(track.lengths[i]).rstrip(b"\r\n"))

    # -- queries -------------------------------------------------------------------------

    def key_names(self) -> list[str]:
        return sorted(key_name(k) for k in self.keys)

    def steps(self, key: Key) -> int:
        kt = self.keys.get(key)
        return len(kt.fits) if kt else 0

    def fits(self, key: Key) -> list[FitRow]:
        kt = self.keys.get(key)
        return list(kt.fits) if kt else []

    def tenor_rows(self, key: Key) -> list[TenorRow]:
        kt = self.keys.get(key)
        return list(kt.tenor_rows) if kt else []

    def _limit(self, kt: _KeyTrack, step: int) -> int:
        """The line before which the state of ``step`` is read."""
        nxt = step + 1
        return kt.surface.lines[nxt] if nxt < len(kt.surface.lines) else self.lines + 1

    def inputs(self, key: Key, step: int) -> ViewInputs | None:
        """What the page shows for ``key`` at ``step`` (0-based, clipped to the steps)."""
        kt = self.keys.get(key)
        if kt is None or not kt.fits:
            return None
        step = max(0, min(step, len(kt.fits) - 1))
        limit = self._limit(kt, step)
        surface = self._read(kt.surface, step)
        tenors = None
        t = kt.tenors.before(limit)
        if t >= 0:
            tenors = self._read(kt.tenors, t)
        greeks: dict[str, Payload] = {}
        rounds: dict[str, int] = {}
        for expiry, track in kt.greeks.items():
            g = track.before(limit)
            if g >= 0:
                payload = self._read(track, g)
                if payload is not None and isinstance(payload.get("instruments"), list):
                    greeks[expiry] = payload
                    # surfaces of the key before this greeks message (as WebState counts)
                    rounds[expiry] = bisect.bisect_left(kt.surface.lines, track.lines[g])
        ts = int(surface.get("ts_ms", 0)) if surface else 0
        return ViewInputs(key, surface, ts, tenors, live_greeks(greeks, rounds, step + 1))

    def shards(self, key: Key, step: int) -> list[dict[str, Any]]:
        """The status topics as of ``step`` of ``key``."""
        kt = self.keys.get(key)
        limit = self._limit(kt, max(0, min(step, len(kt.fits) - 1))) if kt else self.lines + 1
        out = []
        for instance, track in sorted(self.status.items()):
            i = track.before(limit)
            status = self._read(track, i) if i >= 0 else None
            if status is not None:
                out.append(shard_json(instance, status, int(status.get("ts_ms", 0) or 0)))
        return out

    def iter_keys(self) -> Iterator[Key]:
        return iter(sorted(self.keys))
