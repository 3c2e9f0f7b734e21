"""Read recorded feeds back: JSON Lines recordings (DESIGN section 3) and raw cryptofeed captures.

``read_recording(path)`` yields ``(ts_ns, venue, frame_text)`` from ``.jsonl``, ``.jsonl.gz``
and ``.jsonl.zst`` files; the compression is taken from the file's magic bytes (gzip ``1f 8b``,
RFC 1952; zstd ``28 b5 2f fd``, RFC 8878), the suffix only being a hint. Concatenated gzip
members and zstd frames (a recorder that flushed whole frames, or files joined with ``cat``) are
read across.

Reading is tolerant, because recordings are cut off by crashes: a truncated final line, a
compressed stream without its end (the recorder flushes blocks, so a SIGKILLed file decodes up to
its last flush) or corrupt compressed bytes end the iteration cleanly, and a malformed line is
counted in ``ReplayStats.bad_lines`` under a short reason, logged (``replay_bad_line``) and
skipped: nothing here raises on bad data. Only a missing/unreadable file raises ``OSError``.

``read_cryptofeed_capture(path)`` reads cryptofeed's raw capture format (the real 2021 Deribit
capture under ``shared/data/deribit/raw``)::

    wss://www.deribit.com/ws/api/v2 <-> 1626993723.424371            connection opened
    wss://www.deribit.com/ws/api/v2 <- 1626993723.7145221: {...}     frame we sent
    1626993723.804318: {...}                                          frame received
    https://.../get_instruments?currency=BTC -> 1626993723.13: {...}  REST response received

Receive times are epoch seconds with a decimal fraction, converted to ns exactly (no float
rounding).

``iter_frames(paths, speed=...)`` chains several files in order, as fast as possible
(``speed=None``) or paced by ``ts_ns`` at ``speed`` times real time; ``aiter_frames`` is the
asyncio twin (``asyncio.sleep`` for pacing, a zero sleep every few hundred frames otherwise so a
fast replay does not starve the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Protocol

import orjson
import structlog

log = structlog.get_logger(__name__)
_loads = orjson.loads

Frame = tuple[int, str, str]
"""``(ts_ns, venue, frame_text)``: one recorded frame."""

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 16
"""Bytes of text a block (decompressed): small enough to stay in the CPU cache while its
lines are parsed."""
MIN_READ = 1 << 12  # the smallest read of compressed bytes
YIELD_EVERY = 256  # aiter_frames: frames between event-loop yields when not pacing


@dataclass(slots=True)
class ReplayStats:
    """What reading went through: ``lines`` read (blank ones excluded), ``frames`` yielded,
    ``bad_lines`` by reason, whether the input ended mid-line or mid-stream (``truncated``), and
    the compressed-stream error that stopped it, if any (``decode_error``)."""

    files: int = 0
    lines: int = 0
    frames: int = 0
    bad_lines: Counter[str] = field(default_factory=Counter)
    truncated: bool = False
    decode_error: str = ""


# -- decompression --------------------------------------------------------------------------


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


def detect_compression(path: str | os.PathLike[str]) -> str:
    """``"gz"``, ``"zst"`` or ``"none"`` from the file's first bytes (the suffix if empty)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gz"
    if head.startswith(ZSTD_MAGIC):
        return "zst"
    if not head:
        name = os.fspath(path)
        return "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else "none"
    return "none"


def _new_decompressor(kind: str) -> _Decompressor:
    if kind == "gz":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    import zstandard

    d: _Decompressor = zstandard.ZstdDecompressor().decompressobj()
    return d


def _iter_chunks(fh: BinaryIO, kind: str, path: str, stats: ReplayStats) -> Iterator[bytes]:
    """Decompressed chunks of ``fh``; stops cleanly at truncation or corruption."""
    if kind == "none":
        while chunk := fh.read(CHUNK):
            yield chunk
        return
    dec = _new_decompressor(kind)
    started = False  # has the current member/frame consumed any input?
    size = MIN_READ  # compressed bytes a read: sized for about CHUNK bytes out
    try:
        while chunk := fh.read(size):
            while chunk:
                n_in = len(chunk)
                out = dec.decompress(chunk)
                started = True
                if out:
                    # the next read sized for ~CHUNK bytes out: a block of lines that stays
                    # in the cache while it is parsed (a 64 KiB read of zstd made ~0.7 MB,
                    # 0.5 us a frame slower to parse, tested in the bench)
                    size = min(max(CHUNK * n_in // len(out), MIN_READ), CHUNK)
                    yield out
                if dec.eof:  # member/frame complete: the rest starts a new one (or is junk)
                    chunk = dec.unused_data
                    dec = _new_decompressor(kind)
                    started = False
                    if chunk and not (chunk.startswith(GZIP_MAGIC) or chunk.startswith(ZSTD_MAGIC)):
                        if chunk.strip(b"\x00"):
                            stats.decode_error = "trailing garbage after compressed stream"
                            log.warning("replay_trailing_garbage", path=path, kind=kind)
                        return
                else:
                    chunk = b""
    except Exception as exc:  # zlib.error, zstandard.ZstdError: corrupt bytes end the replay
        stats.decode_error = f"{type(exc).__name__}: {exc}"
        stats.truncated = True
        log.warning("replay_decode_error", path=path, kind=kind, error=str(exc))
        return
    if started and not dec.eof:
        stats.truncated = True
        log.info("replay_stream_truncated", path=path, kind=kind)


def _chunks_of(path: str | os.PathLike[str], st: ReplayStats) -> Iterator[bytes]:
    """The decompressed bytes of ``path`` in chunks (compression from the magic bytes)."""
    name = os.fspath(path)
    kind = detect_compression(path)
    hint = "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else "none"
    if hint != kind:
        log.info("replay_compression_mismatch", path=name, suffix=hint, magic=kind)
    with open(path, "rb") as fh:
        yield from _iter_chunks(fh, kind, name, st)


def iter_lines(
    path: str | os.PathLike[str], stats: ReplayStats | None = None
) -> Generator[tuple[int, bytes, bool], None, None]:
    """``(line_no, line_without_newline, complete)`` of a possibly compressed text file.

    ``complete`` is False only for a final line that did not end with a newline.
    """
    st = stats if stats is not None else ReplayStats()
    line_no = 0
    rest = b""
    for chunk in _chunks_of(path, st):
        buf = rest + chunk if rest else chunk
        lines = buf.split(b"\n")
        rest = lines.pop()
        for line in lines:
            line_no += 1
            yield line_no, line.removesuffix(b"\r"), True
    if rest:
        yield line_no + 1, rest, False


# -- recordings -----------------------------------------------------------------------------


def _bad(stats: ReplayStats, path: str, line_no: int, reason: str) -> None:
    stats.bad_lines[reason] += 1
    log.warning("replay_bad_line", path=path, line=line_no, reason=reason)


def read_recording(
    path: str | os.PathLike[str], *, stats: ReplayStats | None = None
) -> Iterator[Frame]:
    """Yield ``(ts_ns, venue, frame_text)`` for every good line of a recording (see module doc).

    Pass a ``ReplayStats`` to learn what was skipped; nothing is raised for bad content. The
    frames come block by block from ``read_recording_batches``; ``stats`` are complete once
    the iteration ends (while it runs they are ahead by at most one block).
    """
    for batch in read_recording_batches(path, stats=stats):
        yield from batch


def read_recording_batches(
    path: str | os.PathLike[str], *, stats: ReplayStats | None = None
) -> Iterator[list[Frame]]:
    """``read_recording``'s frames as one list per decompressed block (about ``CHUNK`` bytes).

    The replay driver's fast loop: a good line costs one ``orjson.loads`` and three key
    lookups; anything else (a blank, malformed or cut-off line, a missing key, a wrong type)
    is handed to ``_slow_line``, which applies the line-by-line rules exactly as
    ``read_recording`` always did (tested with hypothesis against that reference,
    ``tests/test_reader_fast.py``). A line ending in ``\r`` decodes as the same record
    without it (JSON allows trailing whitespace), so only the slow path strips it. ``stats``
    are updated once per block, before the block is yielded.
    """
    st = stats if stats is not None else ReplayStats()
    st.files += 1
    name = os.fspath(path)
    loads = _loads
    line_no = 0  # lines before the current block
    rest = b""
    for chunk in _chunks_of(path, st):
        # BytesIO.readlines finds newlines with memchr: ~50 ns a line where bytes.split
        # walks byte by byte (~350 ns for a 600-byte line); lines keep their b"\n"
        lines = BytesIO(rest + chunk if rest else chunk).readlines()
        rest = lines.pop() if not lines[-1].endswith(b"\n") else b""
        out: list[Frame] = []
        append = out.append
        slow = good_slow = blank = 0  # lines of this block handled by _slow_line
        for line in lines:
            try:
                rec = loads(line)  # the newline (and a \r before it) is JSON whitespace
                ts_ns, venue, frame = rec["ts_ns"], rec["venue"], rec["frame"]
            except Exception:  # not JSON, not an object, a key missing: the careful path
                ts_ns = venue = frame = None
            # orjson hands out exact types; `type(x) is int` also refuses bool, as before
            if type(ts_ns) is int and type(venue) is str and type(frame) is str:
                append((ts_ns, venue, frame))
                continue
            n = line_no + len(out) - good_slow + slow + 1  # this line's number
            slow += 1
            text = line[:-1].removesuffix(b"\r")
            got = _slow_line(st, name, n, text, complete=True)
            if got is None:
                blank += 1
            elif got is not _BAD:
                good_slow += 1
                append(got)  # type: ignore[arg-type]
        line_no += len(lines)
        st.lines += len(lines) - blank
        if out:
            st.frames += len(out)
            yield out
    if rest:
        got = _slow_line(st, name, line_no + 1, rest, complete=False)
        if got is not None and got is not _BAD and got is not _END:
            st.frames += 1
            yield [got]  # type: ignore[list-item]


class Lines(list[bytes]):
    """A block of a recording's lines as read (``BytesIO.readlines``): every item one line
    ending with its ``b"\\n"`` and holding no other, but a cut-off final line, alone in the
    last block. What the compiled scanner relies on to tell lines apart in the block's
    bytes (``streamer.book.scan``); any other list of lines is read the reference way."""

    __slots__ = ()


class TextBlock:
    """A block of a recording's lines as its bytes (``text``: whole lines, each ending with
    ``b"\\n"``, or the cut-off final line alone), the lines themselves made
    only when asked for (``lines()``, once: the same ``Lines`` every call). A consumer that
    reads the bytes itself (the compiled scanner, ``streamer.book.scan``) sets ``count``
    to the lines it consumed, so that nobody needs to split them; else ``count`` is -1."""

    __slots__ = ("_lines", "count", "text")

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.count = -1
        self._lines: Lines | None = None

    def lines(self) -> Lines:
        if self._lines is None:
            self._lines = Lines(BytesIO(self.text).readlines())
        return self._lines


class RecordingLines:
    """A recording's lines, block by block, for a caller that decodes the good ones itself
    (``streamer.book.fastpath.FastPath.parse_lines``: one loop from line to book row).

    Iterating yields lists of lines (each with its ``b"\\n"``; the final line of a file that
    does not end with one comes alone, as the last block). The caller decodes a line the
    way ``read_recording_batches`` does (``orjson.loads``, then ``ts_ns`` an int, ``venue``
    and ``frame`` strings) and hands every other line, in order, to ``careful``, which applies
    the line-by-line rules (``_slow_line``): the frame if there is one, else None (a blank
    line, or a bad one: counted and logged with its line number). ``stats`` count lines and
    frames as ``read_recording`` does, complete once the iteration ends."""

    __slots__ = ("_block", "_final", "_line_no", "_name", "_pos", "_seen", "path", "stats")

    def __init__(self, path: str | os.PathLike[str], *, stats: ReplayStats | None = None) -> None:
        self.path = path
        self.stats = stats if stats is not None else ReplayStats()
        self._name = os.fspath(path)
        self._block = TextBlock(b"")
        self._final = False  # the current block is the cut-off final line
        self._line_no = 0  # lines before the current block
        self._pos = 0  # where careful's search for its line goes on in the block
        self._seen = [0, 0, 0]  # careful, this block: blank, bad, frames (for the stats)

    def __iter__(self) -> Iterator[Lines]:
        for block in self.blocks():
            yield block.lines()

    def blocks(self) -> Iterator[TextBlock]:
        """The blocks as bytes (``TextBlock``): what iterating yields, before the split into
        lines (made only if someone asks for them)."""
        st = self.stats
        st.files += 1
        rest = b""
        for chunk in _chunks_of(self.path, st):
            cut = chunk.rfind(b"\n") + 1  # whole lines up to here
            if not cut:  # no line ends here: all of it is the current line's
                rest += chunk
                continue
            if rest:  # the line begun in the last chunk, then this chunk's whole lines
                text = b"".join((rest, memoryview(chunk)[:cut]))  # one copy
            else:
                text = chunk if cut == len(chunk) else chunk[:cut]
            rest = chunk[cut:]
            block = TextBlock(text)
            self._start(block, final=False)
            yield block
            count = block.count if block.count >= 0 else len(block.lines())
            blank, bad, _ = self._seen
            st.lines += count - blank
            st.frames += count - blank - bad
            self._line_no += count
        if rest:
            block = TextBlock(rest)
            self._start(block, final=True)
            yield block
            blank, _, frames = self._seen
            if not any(self._seen):  # careful never heard of it: a good line
                st.lines += 1
                st.frames += 1
            else:  # _slow_line counted the line itself (complete=False)
                st.frames += frames

    def _start(self, block: TextBlock, *, final: bool) -> None:
        self._block, self._final, self._pos, self._seen = block, final, 0, [0, 0, 0]

    def careful(self, line: bytes) -> Frame | None:
        """The line-by-line rules for ``line`` of the current block: its frame, or None
        (blank, bad: counted and logged, or a cut-off end: ``truncated``)."""
        block, i = self._block.lines(), self._pos
        while i < len(block) and block[i] is not line:  # calls come in line order
            i += 1
        if i == len(block):  # not a line of this block (a caller's bug): as a bad line
            i = self._pos - 1
        self._pos = i + 1
        n = self._line_no + i + 1
        if self._final:
            got = _slow_line(self.stats, self._name, n, line, complete=False)
        else:
            got = _slow_line(self.stats, self._name, n, line[:-1].removesuffix(b"\r"),
                             complete=True)  # fmt: skip
        seen = self._seen
        if got is None:
            seen[0] += 1
            return None
        if got is _BAD or got is _END:
            seen[1] += 1
            return None
        seen[2] += 1
        return got  # type: ignore[return-value]


_BAD = object()  # _slow_line: a counted bad line
_END = object()  # _slow_line: a cut-off final line (the end of the recording)


def _slow_line(
    st: ReplayStats, name: str, line_no: int, line: bytes, *, complete: bool
) -> Frame | object | None:
    """One line by the rules of the module doc: the frame, ``_BAD`` (counted and logged),
    ``_END`` (a cut-off final line: ``truncated``) or None (blank: not a line at all). Adds
    the line to ``st.lines`` only when it is the final, incomplete one (the caller counts
    the rest)."""
    if not line.strip():
        return None
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        if not complete:  # cut off mid-line by a crash: the clean end of the recording
            st.truncated = True
            log.info("replay_truncated_line", path=name, line=line_no)
            return _END
        _bad(st, name, line_no, "invalid_json")
        return _BAD
    if not complete:
        st.lines += 1
    if not isinstance(rec, dict):
        _bad(st, name, line_no, "not_an_object")
        return _BAD
    ts_ns, venue, frame = rec.get("ts_ns"), rec.get("venue"), rec.get("frame")
    if not isinstance(ts_ns, int) or isinstance(ts_ns, bool):
        _bad(st, name, line_no, "bad_ts_ns")
        return _BAD
    if not isinstance(venue, str):
        _bad(st, name, line_no, "bad_venue")
        return _BAD
    if not isinstance(frame, str):
        _bad(st, name, line_no, "bad_frame")
        return _BAD
    return ts_ns, venue, frame


# -- cryptofeed raw captures ----------------------------------------------------------------

_CAPTURE = re.compile(
    rb"^(?:(?P<url>\S+) (?P<dir><->|<-|->) )?(?P<sec>\d+)(?:\.(?P<frac>\d+))?"
    rb"(?::\s?(?P<frame>.*))?$",
    re.DOTALL,
)


def _seconds_to_ns(sec: bytes, frac: bytes | None) -> int:
    digits = (frac or b"")[:9].ljust(9, b"0")
    return int(sec) * 1_000_000_000 + int(digits)


def read_cryptofeed_capture(
    path: str | os.PathLike[str],
    *,
    venue: str = "deribit",
    include_sent: bool = False,
    stats: ReplayStats | None = None,
) -> Iterator[Frame]:
    """Yield ``(ts_ns, venue, frame_text)`` for each received frame of a cryptofeed capture.

    Received websocket frames (``<sec>: <frame>``) and REST responses (``URL -> <sec>:
    <body>``) are yielded; frames we sent (``URL <- ...``) only with ``include_sent``;
    connection markers (``URL <-> <sec>``) and ``configuration:`` lines are skipped silently.
    Other lines count as bad (``unrecognised``).
    """
    st = stats if stats is not None else ReplayStats()
    st.files += 1
    name = os.fspath(path)
    for line_no, line, complete in iter_lines(path, st):
        if not line.strip():
            continue
        st.lines += 1
        if line.startswith(b"configuration:"):
            continue
        m = _CAPTURE.match(line)
        if m is None:
            _bad(st, name, line_no, "unrecognised")
            continue
        direction = m.group("dir")
        frame = m.group("frame")
        if direction == b"<->":
            continue
        if direction == b"<-" and not include_sent:
            continue
        if frame is None or not frame.strip():
            _bad(st, name, line_no, "no_frame")
            continue
        if not complete:
            # A cut-off final line: only keep it if the frame is complete JSON.
            try:
                orjson.loads(frame)
            except orjson.JSONDecodeError:
                st.truncated = True
                return
        try:
            text = frame.decode("utf-8")
        except UnicodeDecodeError:
            _bad(st, name, line_no, "not_utf8")
            continue
        st.frames += 1
        yield _seconds_to_ns(m.group("sec"), m.group("frac")), venue, text


def is_cryptofeed_capture(path: str | os.PathLike[str]) -> bool:
    """True when the first non-blank line of ``path`` is not a JSON object (a capture)."""
    with contextlib.closing(iter_lines(path)) as lines:
        for _, line, _ in lines:
            if line.strip():
                return not line.lstrip().startswith(b"{")
    return False


def read_frames(
    path: str | os.PathLike[str], *, stats: ReplayStats | None = None
) -> Iterator[Frame]:
    """Frames of one file: a recording or (sniffed by content) a cryptofeed capture."""
    if is_cryptofeed_capture(path):
        return read_cryptofeed_capture(path, stats=stats)
    return read_recording(path, stats=stats)


def read_frame_batches(
    path: str | os.PathLike[str], *, stats: ReplayStats | None = None, size: int = 1024
) -> Iterator[list[Frame]]:
    """``read_frames`` in lists: a recording's blocks (``read_recording_batches``), a
    capture's frames ``size`` at a time. Never an empty list."""
    if not is_cryptofeed_capture(path):
        yield from read_recording_batches(path, stats=stats)
        return
    batch: list[Frame] = []
    for frame in read_cryptofeed_capture(path, stats=stats):
        batch.append(frame)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- several files, paced -------------------------------------------------------------------


def _check_speed(speed: float | None) -> None:
    if speed is not None and not speed > 0:
        from streamer.errors import InputError

        raise InputError("speed", f"must be positive (or None for as fast as possible): {speed}")


def iter_frames(
    paths: Iterable[str | os.PathLike[str]],
    *,
    speed: float | None = None,
    clock: Callable[[], int] = time.monotonic_ns,
    sleep: Callable[[float], None] = time.sleep,
    stats: ReplayStats | None = None,
) -> Iterator[Frame]:
    """Frames of ``paths`` in the order given, each file via ``read_frames``.

    ``speed=None`` yields as fast as possible; ``speed=X`` holds each frame back until
    ``(ts_ns - first_ts_ns) / X`` ns have passed on ``clock`` (monotonic ns) since the first
    one, sleeping with ``sleep(seconds)``. Frames whose ``ts_ns`` goes backwards are not
    delayed.
    """
    _check_speed(speed)
    first_ts: int | None = None
    start = 0
    for path in paths:
        for frame in read_frames(path, stats=stats):
            if speed is not None:
                if first_ts is None:
                    first_ts, start = frame[0], clock()
                delay_ns = start + (frame[0] - first_ts) / speed - clock()
                if delay_ns > 0:
                    sleep(delay_ns / 1e9)
            yield frame


async def aiter_frames(
    paths: Iterable[str | os.PathLike[str]],
    *,
    speed: float | None = None,
    clock: Callable[[], int] = time.monotonic_ns,
    stats: ReplayStats | None = None,
) -> AsyncIterator[Frame]:
    """``iter_frames`` for asyncio: paces with ``asyncio.sleep`` (file reads stay synchronous:
    chunks of 64 KiB, quick)."""
    _check_speed(speed)
    first_ts: int | None = None
    start = 0
    n = 0
    for path in paths:
        for frame in read_frames(path, stats=stats):
            n += 1
            if speed is not None:
                if first_ts is None:
                    first_ts, start = frame[0], clock()
                delay_ns = start + (frame[0] - first_ts) / speed - clock()
                if delay_ns > 0:
                    await asyncio.sleep(delay_ns / 1e9)
                elif n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            elif n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            yield frame


_RECORDING_NAME = re.compile(r"^(?P<venue>.+)-(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?\.jsonl")


def _recording_key(path: Path) -> tuple[str, str, int, str]:
    m = _RECORDING_NAME.match(path.name)
    if m is None:
        return ("", "", 0, path.name)
    return (m.group("venue"), m.group("stamp"), int(m.group("n") or 0), path.name)


def recording_paths(directory: str | os.PathLike[str], venue: str | None = None) -> list[Path]:
    """Recordings in ``directory`` (optionally of one venue) in time order: the recorder names
    files ``{venue}-{UTC stamp}[-n].jsonl*``, ``-n`` breaking ties within one second."""
    pattern = f"{venue}-*.jsonl*" if venue else "*.jsonl*"
    return sorted(Path(directory).glob(pattern), key=_recording_key)
