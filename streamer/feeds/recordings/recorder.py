"""Record raw feed frames to JSON Lines files (DESIGN section 3), rotating and crash-safe.

One received frame a line, written before any parsing::

    {"ts_ns": 1735693199241000000, "venue": "deribit", "frame": "<the frame text as received>"}

``ts_ns`` is the local receive time (integer ns since the epoch). Files are named
``{venue}-{YYYYmmddTHHMMSS}Z.jsonl[.zst|.gz]`` after the UTC time they were opened (``-1``,
``-2`` ... appended on a name clash) and rotate when they hold ``rotate_bytes`` bytes of
(uncompressed) lines or have been open ``rotate_seconds``.

Crash safety: the recorder pushes everything written so far to the OS at least every
``flush_interval_s`` (checked on each ``write``; a service also calls ``flush()`` from a timer so
quiet periods are covered). For compressed files this is a real stream flush, not just a buffer
flush: zstd ends the current block (``FLUSH_BLOCK``, RFC 8878 section 3.1.1.2) and gzip emits a
sync flush (``Z_SYNC_FLUSH``, an empty stored block ending on a byte boundary, RFC 1951 section
3.2.4), so the bytes on disk decode up to the last flushed line even when the process is killed
with SIGKILL before the stream's end marker is written. ``streamer.feeds.replay`` reads such a
cut-off file up to its last complete line. Data reaches the disk itself only when the OS writes
its page cache back; pass ``fsync=True`` to force that on every flush (power-loss safety, slower).

The core is synchronous: a write is an ``orjson.dumps`` plus a buffered (compressed) write, cheap
enough to call from the event loop.
"""

from __future__ import annotations

import gzip
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Protocol, Self

import orjson
import structlog

from streamer.errors import FeedError, InputError

log = structlog.get_logger(__name__)

Compression = Literal["zst", "gz", "none"]

DEFAULT_ROTATE_BYTES = 256 * 1024 * 1024
DEFAULT_ROTATE_SECONDS = 3600.0
DEFAULT_FLUSH_INTERVAL_S = 1.0
DEFAULT_ZSTD_LEVEL = 3

SUFFIXES: dict[str, str] = {"zst": ".jsonl.zst", "gz": ".jsonl.gz", "none": ".jsonl"}


@dataclass(frozen=True, slots=True)
class RecorderStats:
    """Counters since the recorder was made: frames and (uncompressed) line bytes written,
    files opened, frames whose bytes were not valid UTF-8 (stored with U+FFFD replacements)."""

    frames: int
    bytes: int
    files: int
    decode_errors: int = 0


class _Sink(Protocol):
    """The writable end of one recording file (plain, gzip or zstd)."""

    def write(self, data: bytes) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class _PlainSink:
    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw

    def write(self, data: bytes) -> int:
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.close()


class _GzipSink:
    def __init__(self, raw: BinaryIO, name: str) -> None:
        self._raw = raw
        self._gz = gzip.GzipFile(filename=name, mode="wb", fileobj=raw)

    def write(self, data: bytes) -> int:
        return self._gz.write(data)

    def flush(self) -> None:
        # Z_SYNC_FLUSH ends on a byte boundary: a decoder can decode every line written so far.
        self._gz.flush(zlib.Z_SYNC_FLUSH)
        self._raw.flush()

    def close(self) -> None:
        self._gz.close()  # writes the gzip trailer (CRC32, ISIZE)
        self._raw.close()


class _ZstdSink:
    def __init__(self, raw: BinaryIO, level: int) -> None:
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        cctx = zstandard.ZstdCompressor(level=level)
        self._writer: Any = cctx.stream_writer(raw, closefd=False)

    def write(self, data: bytes) -> int:
        written: int = self._writer.write(data)
        return written

    def flush(self) -> None:
        # End the current block: everything so far is decodable without the frame epilogue.
        self._writer.flush(self._zstd.FLUSH_BLOCK)
        self._raw.flush()

    def close(self) -> None:
        self._writer.flush(self._zstd.FLUSH_FRAME)
        self._writer.close()
        self._raw.close()


def _utc_stamp(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y%m%dT%H%M%SZ")


class Recorder:
    """Append received frames to rotating JSON Lines recordings in ``directory``.

    Args:
        directory: where files go (created if missing).
        venue: the ``venue`` field of every line and the file-name prefix (``deribit``).
        rotate_bytes: start a new file once this many bytes of (uncompressed) lines are in the
            current one.
        rotate_seconds: start a new file once the current one has been open this long.
        compression: ``"zst"`` (default; needs ``zstandard``), ``"gz"`` or ``"none"``.
        flush_interval_s: longest time written lines may sit in buffers (checked on each write;
            call ``flush()`` periodically to cover quiet periods). 0 flushes every write.
        clock: ns since the epoch; names files and times flushes and rotation (tests inject).
        zstd_level: zstd compression level.
        fsync: also ``os.fsync`` on every flush (survives power loss, costs a disk sync).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        venue: str,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        rotate_seconds: float = DEFAULT_ROTATE_SECONDS,
        compression: Compression = "zst",
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        clock: Callable[[], int] = time.time_ns,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        fsync: bool = False,
    ) -> None:
        if not venue or "/" in venue or os.sep in venue:
            raise InputError("venue", f"must be a non-empty name usable in a file name: {venue!r}")
        if compression not in SUFFIXES:
            raise InputError("compression", f"must be one of {sorted(SUFFIXES)}: {compression!r}")
        if rotate_bytes <= 0:
            raise InputError("rotate_bytes", f"must be positive: {rotate_bytes}")
        if rotate_seconds <= 0:
            raise InputError("rotate_seconds", f"must be positive: {rotate_seconds}")
        if flush_interval_s < 0:
            raise InputError("flush_interval_s", f"must be >= 0: {flush_interval_s}")
        self.directory = Path(directory)
        self.venue = venue
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.compression: Compression = compression
        self.flush_interval_s = flush_interval_s
        self.fsync = fsync
        self._clock = clock
        self._zstd_level = zstd_level
        self._sink: _Sink | None = None
        self._fd: int = -1
        self._path: Path | None = None
        self._paths: list[Path] = []
        self._opened_ns = 0
        self._file_bytes = 0
        self._last_flush_ns = 0
        self._dirty = False
        self._closed = False
        self._frames = 0
        self._bytes = 0
        self._decode_errors = 0

    # -- public API -------------------------------------------------------------------------

    @property
    def stats(self) -> RecorderStats:
        """A snapshot of the counters."""
        return RecorderStats(
            frames=self._frames,
            bytes=self._bytes,
            files=len(self._paths),
            decode_errors=self._decode_errors,
        )

    @property
    def path(self) -> Path | None:
        """The file being written (None before the first frame and after ``close``)."""
        return self._path

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file this recorder has opened, oldest first."""
        return tuple(self._paths)

    def write(self, frame: str | bytes, recv_ns: int) -> None:
        """Append one frame received at ``recv_ns`` (ns since the epoch)."""
        if self._closed:
            raise FeedError(f"recorder for {self.venue} is closed")
        if isinstance(frame, bytes | bytearray | memoryview):
            raw = bytes(frame)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                self._decode_errors += 1
                log.warning("recorder_frame_not_utf8", venue=self.venue, recv_ns=recv_ns)
        else:
            text = frame
        line = orjson.dumps({"ts_ns": int(recv_ns), "venue": self.venue, "frame": text}) + b"\n"
        now = self._clock()
        if self._sink is not None and (
            self._file_bytes >= self.rotate_bytes
            or now - self._opened_ns >= self.rotate_seconds * 1e9
        ):
            self._finish_file()
        if self._sink is None:
            self._open_file(now)
        assert self._sink is not None
        self._sink.write(line)
        self._dirty = True
        self._file_bytes += len(line)
        self._frames += 1
        self._bytes += len(line)
        if now - self._last_flush_ns >= self.flush_interval_s * 1e9:
            self._flush(now)

    def flush(self) -> None:
        """Make every line written so far decodable from disk (see the module docstring)."""
        if self._sink is not None and self._dirty:
            self._flush(self._clock())

    def close(self) -> None:
        """Finish the current file (compressed stream trailer included). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finish_file()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _open_file(self, now_ns: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"{self.venue}-{_utc_stamp(now_ns)}"
        suffix = SUFFIXES[self.compression]
        n = 0
        while True:
            path = self.directory / f"{stem}{'' if n == 0 else f'-{n}'}{suffix}"
            try:
                raw: BinaryIO = path.open("xb")
                break
            except FileExistsError:
                n += 1
        sink: _Sink
        if self.compression == "zst":
            sink = _ZstdSink(raw, self._zstd_level)
        elif self.compression == "gz":
            sink = _GzipSink(raw, path.name.removesuffix(".gz"))
        else:
            sink = _PlainSink(raw)
        self._sink = sink
        self._fd = raw.fileno()
        self._path = path
        self._paths.append(path)
        self._opened_ns = now_ns
        self._file_bytes = 0
        self._last_flush_ns = now_ns
        log.info("recorder_file_opened", venue=self.venue, path=str(path))

    def _flush(self, now_ns: int) -> None:
        assert self._sink is not None
        self._sink.flush()
        if self.fsync:
            os.fsync(self._fd)
        self._last_flush_ns = now_ns
        self._dirty = False

    def _finish_file(self) -> None:
        if self._sink is None:
            return
        sink, path = self._sink, self._path
        self._sink, self._path, self._fd = None, None, -1
        sink.close()
        if self.fsync and path is not None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        log.info("recorder_file_closed", venue=self.venue, path=str(path), bytes=self._file_bytes)
