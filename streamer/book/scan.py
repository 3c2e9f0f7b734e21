"""The compiled recording scanner: a block of recording lines straight into book rows.

``scan_block`` walks the bytes of a block of recording lines (DESIGN section 3: one
``{"ts_ns": ..., "venue": ..., "frame": "..."}`` object a line, the frame a JSON string) and,
for every line that is a plain Deribit ticker notification of a channel it has been told
about (``ChannelTable``), parses the frame inside the record's string in the same pass (no
unescaping, no objects: the frame's quotes are the two bytes ``\\"``) and writes the row
straight into the book's array. At a line it does not take it reads on, writing nothing,
over the lines it does not take either, and stops before the next one it would: the caller
handles that run the reference way (``streamer.book.fastpath.FastPath``), in order, and
calls again after it (so a line taken later sees what the run did to the books).

It is conservative by construction: it *takes* a line only when the line is in a narrow
grammar, and *declines* anything else, so deciding never needs to match the reference's
error handling, only its successes. A taken line is:

* the record's keys exactly ``ts_ns``, ``venue``, ``frame`` in that order, no whitespace, an
  optional ``\\r`` before the newline; ``ts_ns`` a non-negative integer below 9e18;
  strings of printable ASCII with no escape other than the frame's ``\\"``;
* the frame one object whose keys, at every level, are from the field table the caller gives
  (the typed ticker decoder's fields, ``FastPath``: ``jsonrpc``/``method``/``params``;
  ``channel``/``data``; the ticker's data fields; ``greeks``; ``stats``), each at most once,
  every required one present, each value of its field's kind: an exact number (below), an
  integer, a string, an object of the next level, ``null`` where the field allows it, or any
  scalar (string, number, ``true``, ``false``, ``null``) for fields the book does not keep;
  no whitespace;
* numbers by the JSON grammar (RFC 8259 section 6), read exactly, so the value is the
  double that orjson and msgspec read (correctly rounded): a decimal significand of at most
  2^53 with a power of ten within 10^+-22 by one IEEE multiplication or division by that
  exact power (Clinger 1990, "How to read floating point numbers accurately", the fast
  path); a larger significand (up to 18 digits: a double printed in full, such as a forward
  derived from other prices) with a negative power down to 10^-22 by exact binary long
  division (``_quotient``); any other number (more digits, a larger exponent) declines the
  line.

So every taken line is one that the typed ticker decoder accepts with the same values, and
the row written is the one the fused path writes (tested line by line against it, on real
recordings and on hypothesis-made byte soup, ``tests/test_scan.py``).

The channel table maps a channel's bytes (FNV-1a hash, open addressing) to the instrument
name the frame must carry and the ``(book, slot)`` row it goes to; its owner keeps it
current (``FastPath``: an entry is added after the reference path has handled a line of an
unknown channel; when a book's array is regrown the table points at the new one, and when an
instrument is removed the entries whose route no longer holds are dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt
from numba import njit

# scan_block's statuses
END = 0  # every line up to `end` taken
STOP = 1  # a run of lines not taken at out[POS]: out[RUN] of them
# a line's
TAKE = 0  # a plain ticker of a channel in the table: written
DECLINE = 1  # not a line this scanner takes
UNKNOWN = 2  # a good ticker line, but its channel (or its instrument) is not in the table

# out[] slots
POS = 0  # where the lines not taken start (or `end`)
DONE = 1  # lines taken
LAST_TS = 2  # ts_ns of the last line taken
NEXT = 3  # where the line after the lines not taken starts
RUN = 4  # lines not taken
OUT_SIZE = 5
RUN_MAX = 256  # lines not taken in one stop, at most

# field kinds
SCALAR, NUMBER, INT, STRING, OBJECT, OBJECT_OR_NULL = range(6)
# value columns (the book's row order: TS .. DELTA; streamer.book.book)
NVAL = 11
# string spans
SPAN_CHANNEL, SPAN_NAME = 0, 1
WIDTH = 64  # bytes kept per channel or instrument name in the table
DEPTH_MAX = 8

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)

_POW10 = np.array([10.0**k for k in range(23)])  # exact doubles up to 1e22
_POW5 = np.array([5**k for k in range(23)], dtype=np.int64)
_TWO53 = 2**53
_TWO54 = 2**54
_TWO55 = 2**55

_Q, _BS, _LB, _RB, _CO, _CM = 34, 92, 123, 125, 58, 44  # " \ { } : ,
_NL, _CR = 10, 13
_PLAIN = np.array([32 <= c <= 126 and c not in (_Q, _BS) for c in range(256)])
"""Bytes a string may hold as they are: printable ASCII but the quote and the backslash."""

IntArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float64]


@njit(cache=True, nogil=True)
def fnv1a(b: ByteArray, start: int, stop: int) -> int:
    """FNV-1a 64-bit hash of ``b[start:stop]`` (Fowler, Noll, Vo), as a signed int64."""
    h = _FNV_OFFSET
    for i in range(start, stop):
        h = (h ^ np.uint64(b[i])) * _FNV_PRIME
    return int(np.int64(h))


@njit(cache=True, nogil=True, inline="always")
def _number(b: ByteArray, i: int, end: int) -> tuple[int, float, bool]:
    """A JSON number at ``b[i]``: (the position after it, or -1 when it is not a number or
    not one read exactly; its value; whether it is an integer: no fraction, no exponent).
    ``b[end - 1]`` must be a newline (as in ``scan_block``): the digit loops stop there."""
    neg = False
    if i < end and b[i] == 45:  # -
        neg = True
        i += 1
    if i >= end:
        return -1, 0.0, False
    w = 0
    nd = 0  # digits in w, at most 18 (below 2^63)
    c = b[i]
    if c == 48:  # 0: no digits may follow
        i += 1
    elif 49 <= c <= 57:
        while 48 <= b[i] <= 57:  # stops at the newline at b[end - 1] at the latest
            w = w * 10 + (b[i] - 48)
            nd += 1
            i += 1
    else:
        return -1, 0.0, False
    integer = True
    e10 = 0
    if i < end and b[i] == 46:  # .
        integer = False
        i += 1
        if i >= end or not (48 <= b[i] <= 57):
            return -1, 0.0, False
        while 48 <= b[i] <= 57:  # stops at the newline at b[end - 1] at the latest
            w = w * 10 + (b[i] - 48)
            nd += 1
            e10 -= 1
            i += 1
    if i < end and (b[i] == 101 or b[i] == 69):  # e E
        integer = False
        i += 1
        eneg = False
        if i < end and (b[i] == 43 or b[i] == 45):
            eneg = b[i] == 45
            i += 1
        if i >= end or not (48 <= b[i] <= 57):
            return -1, 0.0, False
        x = 0
        while 48 <= b[i] <= 57:  # stops at the newline at b[end - 1] at the latest
            if x < 100_000:
                x = x * 10 + (b[i] - 48)
            i += 1
        e10 += -x if eneg else x
    if nd > 18:  # (w may have wrapped: refused on the count)
        return -1, 0.0, False
    if w == 0:
        v = 0.0
    elif e10 == 0:
        v = float(w)  # one correctly rounded conversion
    elif w <= _TWO53 and 0 < e10 <= 22:
        v = float(w) * _POW10[e10]
    elif w <= _TWO53 and -22 <= e10 < 0:
        v = float(w) / _POW10[-e10]
    elif -22 <= e10 < 0:
        v = _quotient(w, -e10)
    else:
        return -1, 0.0, False
    if integer:  # an integer is float(int): -0 is 0.0, as orjson and msgspec read it
        return i, float(-w) if neg else v, True
    return i, -v if neg else v, False


@njit(cache=True, nogil=True)
def _quotient(w: int, k: int) -> float:
    """``w / 10**k`` correctly rounded (to nearest, ties to even) for ``2**53 < w < 10**18``
    and ``1 <= k <= 22``, where the one-division fast path is not exact: ``w / 5**k`` by
    exact binary long division to 55 significant bits plus a sticky bit, rounded to 53,
    then scaled by ``2**-k`` (exact)."""
    d = _POW5[k]  # < 2^52
    q = w // d
    rem = w - q * d
    s = 0  # q = floor(w * 2^s / d), or that with its low bits dropped into sticky
    sticky = 0
    while q >= _TWO55:
        sticky |= q & 1
        q >>= 1
        s -= 1
    while q < _TWO54:
        rem <<= 1
        q <<= 1
        if rem >= d:
            rem -= d
            q |= 1
        s += 1
    if rem:
        sticky = 1
    m = q >> 2
    half = (q >> 1) & 1
    below = (q & 1) | sticky
    if half and (below or (m & 1)):
        m += 1
    return math.ldexp(float(m), 2 - s - k)


@njit(cache=True, nogil=True, inline="always")
def _string(b: ByteArray, i: int, end: int, span: IntArray) -> int:
    """A frame string at ``b[i]`` (delimited by the two bytes ``\\"``): its content in
    ``span[0:2]``, the position after it, or -1 (not one, or an escape in it)."""
    if i + 1 >= end or b[i] != _BS or b[i + 1] != _Q:
        return -1
    i += 2
    s = i
    while _PLAIN[b[i]]:  # stops at the newline at b[end - 1] at the latest
        i += 1
    if i + 1 < end and b[i] == _BS and b[i + 1] == _Q:
        span[0] = s
        span[1] = i
        return i + 2
    return -1


@njit(cache=True, nogil=True, inline="always")
def _literal(b: ByteArray, i: int, end: int, word: ByteArray) -> int:
    n: int = word.shape[0]
    if i + n > end:
        return -1
    for k in range(n):
        if b[i + k] != word[k]:
            return -1
    return i + n


_TRUE = np.frombuffer(b"true", dtype=np.uint8)
_FALSE = np.frombuffer(b"false", dtype=np.uint8)
_NULL = np.frombuffer(b"null", dtype=np.uint8)
_REC_TS = np.frombuffer(b'{"ts_ns":', dtype=np.uint8)
_REC_VENUE = np.frombuffer(b',"venue":"', dtype=np.uint8)
_REC_FRAME = np.frombuffer(b'","frame":"', dtype=np.uint8)


@njit(cache=True, nogil=True, inline="always")
def _scalar(b: ByteArray, i: int, end: int, span: IntArray) -> int:
    c = b[i] if i < end else 0
    if c == _BS:
        return _string(b, i, end, span)
    if c == 116:
        return _literal(b, i, end, _TRUE)
    if c == 102:
        return _literal(b, i, end, _FALSE)
    if c == 110:
        return _literal(b, i, end, _NULL)
    return _number(b, i, end)[0]


@njit(cache=True, nogil=True, inline="always")
def _key(
    b: ByteArray, s: int, e: int, keys: ByteArray, kmeta: IntArray, lo: int, hi: int, guess: int
) -> int:
    """The index of the key ``b[s:e]`` among ``keys[lo:hi]`` (``guess`` tried first), or -1."""
    n = e - s
    k = guess if lo <= guess < hi else lo
    for _ in range(hi - lo):
        if kmeta[k, 3] == n:
            same = True
            for j in range(n):
                if keys[k, j] != b[s + j]:
                    same = False
                    break
            if same:
                return int(k)
        k += 1
        if k == hi:
            k = lo
    return -1


@njit(cache=True, nogil=True)
def _frame(
    b: ByteArray,
    i: int,
    end: int,
    keys: ByteArray,
    kmeta: IntArray,
    levels: IntArray,
    vals: FloatArray,
    spans: IntArray,
    work: IntArray,
    follow: IntArray,
) -> int:
    """The frame object at ``b[i]`` by the field table: the position after it, or -1.
    ``kmeta[k]`` = (level, kind, column or child level, length); ``levels[l]`` = (first
    key, end of keys, required mask). ``work``: scratch (``3 * DEPTH_MAX + 2``).
    ``follow``: the key that came after each key (and first in each level) last time,
    tried before any search (a venue sends its keys in one order): read, and learned."""
    if i >= end or b[i] != _LB:
        return -1
    nkeys = kmeta.shape[0]
    span = work[3 * DEPTH_MAX :]
    depth = 0
    work[0] = 0  # level at depth d: work[d]; keys seen: work[DEPTH_MAX + d]
    work[DEPTH_MAX] = 0
    prev = nkeys  # the previous key at this depth (nkeys + level: none yet)
    i += 1
    first = True
    while True:
        level = work[depth]
        if first and i < end and b[i] == _RB:
            close = True
        else:
            # a member: key, colon, value. The expected key first: the same bytes as a
            # string of exactly that content followed by a colon
            k = int(follow[prev])
            if k >= 0:
                n = kmeta[k, 3]
                j = i + 2 + n
                if (
                    j + 2 < end
                    and b[i] == _BS
                    and b[i + 1] == _Q
                    and b[j] == _BS
                    and b[j + 1] == _Q
                    and b[j + 2] == _CO
                ):
                    for t in range(n):
                        if keys[k, t] != b[i + 2 + t]:
                            k = -1
                            break
                    if k >= 0:
                        i = j + 3
                else:
                    k = -1
            if k < 0:
                i = _string(b, i, end, span)
                if i < 0 or i >= end or b[i] != _CO:
                    return -1
                i += 1
                lo = levels[level, 0]
                k = _key(b, span[0], span[1], keys, kmeta, lo, levels[level, 1], lo)
                if k < 0:
                    return -1
                follow[prev] = k
            prev = k
            bit = np.int64(1) << (k - levels[level, 0])
            if work[DEPTH_MAX + depth] & bit:
                return -1
            work[DEPTH_MAX + depth] |= bit
            kind = kmeta[k, 1]
            col = kmeta[k, 2]
            if kind == NUMBER:
                i, v, _ = _number(b, i, end)
                if i < 0:
                    return -1
                vals[col] = v
            elif kind == INT:
                if i >= end or not (48 <= b[i] <= 57):  # a non-negative integer
                    return -1
                i, v, integer = _number(b, i, end)
                if i < 0 or not integer:
                    return -1
                vals[col] = v
            elif kind == STRING:
                i = _string(b, i, end, span)
                if i < 0:
                    return -1
                spans[col, 0] = span[0]
                spans[col, 1] = span[1]
            elif kind == SCALAR:
                i = _scalar(b, i, end, span)
                if i < 0:
                    return -1
            elif kind == OBJECT_OR_NULL and i < end and b[i] == 110:
                i = _literal(b, i, end, _NULL)
                if i < 0:
                    return -1
            elif i < end and b[i] == _LB:  # OBJECT, OBJECT_OR_NULL
                if depth + 1 >= DEPTH_MAX:
                    return -1
                work[2 * DEPTH_MAX + depth] = k  # the parent's key, for after the object
                depth += 1
                work[depth] = col
                work[DEPTH_MAX + depth] = 0
                prev = nkeys + col
                i += 1
                first = True
                continue
            else:
                return -1
            close = False
        # after a value (or an empty object's opening)
        while True:
            if not close:
                if i >= end:
                    return -1
                c = b[i]
                if c == _CM:
                    i += 1
                    first = False
                    break
                if c != _RB:
                    return -1
            # closing the object at this depth
            req = levels[work[depth], 2]
            if work[DEPTH_MAX + depth] & req != req:
                return -1
            i += 1
            if depth == 0:
                return i
            depth -= 1
            prev = work[2 * DEPTH_MAX + depth]
            close = False
        # next member of the same object


@njit(cache=True, nogil=True)
def _lookup(
    b: ByteArray, cs: int, ce: int, tab: IntArray, ent_bytes: ByteArray, ent_meta: IntArray
) -> int:
    """The entry of channel ``b[cs:ce]``, or -1."""
    n = ce - cs
    if n > WIDTH:
        return -1
    mask = tab.shape[0] - 1
    h = fnv1a(b, cs, ce) & mask
    while True:
        e = tab[h] - 1
        if e < 0:
            return -1
        if ent_meta[e, 0] == n:
            same = True
            for j in range(n):
                if ent_bytes[e, j] != b[cs + j]:
                    same = False
                    break
            if same:
                return int(e)
        h = (h + 1) & mask


@njit(cache=True, nogil=True)
def _next_line(b: ByteArray, pos: int, end: int) -> int:
    """Where the line after the one starting at ``pos`` starts."""
    nl = pos
    while nl < end and b[nl] != _NL:
        nl += 1
    return min(nl + 1, end)


@njit(cache=True, nogil=True)
def _line(
    b: ByteArray,
    pos: int,
    end: int,
    keys: ByteArray,
    kmeta: IntArray,
    levels: IntArray,
    tab: IntArray,
    ent_bytes: ByteArray,
    ent_meta: IntArray,
    follow: IntArray,
    vals: FloatArray,
    spans: IntArray,
    work: IntArray,
) -> tuple[int, int, int, int]:
    """Read the line at ``pos`` (nothing written): (``TAKE``, ``DECLINE`` or ``UNKNOWN``;
    where the next line starts; the table entry (``TAKE``); its ``ts_ns``). Parsed up to
    the block's end: nothing in the grammar matches a newline, so a good line never runs
    into the next, and its newline is only looked for when declined."""
    i = _literal(b, pos, end, _REC_TS)
    if i < 0 or i >= end or not (48 <= b[i] <= 57):
        return DECLINE, _next_line(b, pos, end), -1, 0
    ts = 0
    nd = 0
    if b[i] == 48:
        i += 1
    else:
        while 48 <= b[i] <= 57 and nd < 20:
            ts = ts * 10 + (b[i] - 48)
            nd += 1
            i += 1
    # at most 19 digits, the 19th after an 8 at most: below 2^63
    if nd == 20 or (nd == 19 and b[i - 19] > 56):
        return DECLINE, _next_line(b, pos, end), -1, 0
    i = _literal(b, i, end, _REC_VENUE)
    if i < 0:
        return DECLINE, _next_line(b, pos, end), -1, 0
    while _PLAIN[b[i]]:  # the venue: printable ASCII, no escape
        i += 1
    i = _literal(b, i, end, _REC_FRAME)
    if i < 0:
        return DECLINE, _next_line(b, pos, end), -1, 0
    # every other column and both spans are required fields: set whenever the frame parses
    vals[6] = 0.0  # mark, bid, ask IV: absent = 0 (none), as the fused path reads them
    vals[7] = 0.0
    vals[8] = 0.0
    i = _frame(b, i, end, keys, kmeta, levels, vals, spans, work, follow)
    if i < 0 or i + 1 >= end or b[i] != _Q or b[i + 1] != _RB:
        return DECLINE, _next_line(b, pos, end), -1, 0
    i += 2
    if i < end and b[i] == _CR:
        i += 1
    if i >= end or b[i] != _NL:
        return DECLINE, _next_line(b, pos, end), -1, 0
    nxt = i + 1
    e = _lookup(b, spans[SPAN_CHANNEL, 0], spans[SPAN_CHANNEL, 1], tab, ent_bytes, ent_meta)
    if e < 0:
        return UNKNOWN, nxt, -1, ts
    ns = spans[SPAN_NAME, 0]
    nn = spans[SPAN_NAME, 1] - ns
    if nn != ent_meta[e, 1]:
        return UNKNOWN, nxt, -1, ts
    for j in range(nn):
        if ent_bytes[e, WIDTH + j] != b[ns + j]:
            return UNKNOWN, nxt, -1, ts
    return TAKE, nxt, e, ts


@njit(cache=True, nogil=True)
def scan_block(
    b: ByteArray,
    pos: int,
    end: int,
    keys: ByteArray,
    kmeta: IntArray,
    levels: IntArray,
    tab: IntArray,
    ent_bytes: ByteArray,
    ent_meta: IntArray,
    rows: tuple[FloatArray, ...],
    follow: IntArray,
    out: IntArray,
    run: IntArray,
) -> int:
    """Take the lines of ``b[pos:end]`` (module doc) until one is not taken, then read on
    over the lines that are not taken either (nothing written), up to the next it would
    take: ``END`` (all taken) or ``STOP``, with ``out`` (``DONE`` lines taken,
    ``LAST_TS``; ``POS`` where the lines not taken start, ``RUN`` how many, ``NEXT`` the
    line after them) and ``run[2 m : 2 m + 2]`` the channel of the m-th of them (an
    ``UNKNOWN`` one, else -1, -1). A taken line's row is written into ``rows[book][slot]``
    as the fused path writes it. ``b[end - 1]`` must be a newline (else nothing is read:
    ``STOP`` with a run of one)."""
    done = 0
    out[DONE] = 0
    out[RUN] = 0
    if end <= pos or b[end - 1] != _NL:  # the byte loops stop at the final newline
        out[POS] = pos
        out[NEXT] = end
        out[RUN] = 1
        run[0] = -1
        run[1] = -1
        return STOP
    vals = np.empty(NVAL)
    spans = np.zeros((2, 2), dtype=np.int64)
    work = np.zeros(3 * DEPTH_MAX + 2, dtype=np.int64)
    m = 0  # lines not taken, from out[POS]
    cap = run.shape[0] // 2
    while pos < end:
        status, nxt, e, ts = _line(
            b, pos, end, keys, kmeta, levels, tab, ent_bytes, ent_meta, follow, vals, spans,
            work,
        )  # fmt: skip
        if status == TAKE:
            if m:  # the end of a run not taken: stop before this line
                break
            row = rows[ent_meta[e, 2]][ent_meta[e, 3]]
            bid = vals[1]
            row[0] = vals[0]
            if bid != 0.0:
                row[1] = bid
                row[2] = vals[2]
            else:
                row[1] = np.nan
                row[2] = np.nan
            ask = vals[3]
            if ask != 0.0:
                row[3] = ask
                row[4] = vals[4]
            else:
                row[3] = np.nan
                row[4] = np.nan
            row[5] = vals[5]
            for c in range(6, 9):
                v = vals[c]
                row[c] = v / 100.0 if v != 0.0 else np.nan
            row[9] = vals[9]
            row[10] = vals[10]
            done += 1
            out[LAST_TS] = ts
        else:
            if m == 0:
                out[POS] = pos
            if status == UNKNOWN:
                run[2 * m] = spans[SPAN_CHANNEL, 0]
                run[2 * m + 1] = spans[SPAN_CHANNEL, 1]
            else:
                run[2 * m] = -1
                run[2 * m + 1] = -1
            m += 1
            if m == cap:
                pos = nxt
                break
        pos = nxt
    out[DONE] = done
    out[RUN] = m
    out[NEXT] = pos
    if m == 0:
        out[POS] = pos
        return END
    return STOP


@njit(cache=True, nogil=True)
def _insert(tab: IntArray, ent_bytes: ByteArray, ent_meta: IntArray, e: int) -> None:
    mask = tab.shape[0] - 1
    h = fnv1a(ent_bytes[e], 0, ent_meta[e, 0]) & mask
    while tab[h] != 0:
        h = (h + 1) & mask
    tab[h] = e + 1


@njit(cache=True, nogil=True)
def _insert_range(
    tab: IntArray, ent_bytes: ByteArray, ent_meta: IntArray, lo: int, hi: int
) -> None:
    for e in range(lo, hi):
        _insert(tab, ent_bytes, ent_meta, e)


BOOKS_MAX = 8
"""Books a table writes into (of one venue); instruments of more take the reference way."""
_SPARE = np.full((1, NVAL), np.nan)  # fills the rows tuple up to BOOKS_MAX (never written)
_LOADED: list[bool] = []


def _load() -> None:
    """Load (or compile) the kernels the table runs once per process, with the types the
    table calls them with, so a first channel costs no compilation mid-stream."""
    if _LOADED:
        return
    _LOADED.append(True)
    table = ChannelTable.__new__(ChannelTable)
    table._alloc(1)
    _insert_range(table.tab, table.ent_bytes, table.ent_meta, 0, 1)


class HasRows(Protocol):
    """A book as the table sees it: its rows (``streamer.book.book.Book.row_array``)."""

    @property
    def row_array(self) -> FloatArray: ...


class ChannelTable:
    """Channels the scanner may take: channel bytes -> (instrument name, book row). Grows
    by doubling; ``refresh`` follows books whose rows moved (regrown); ``retain`` keeps
    the entries whose routes still hold (after instruments were removed: their slots may
    be reused); ``clear`` forgets everything. ``rows`` is always a tuple of ``BOOKS_MAX``
    arrays (one compiled ``scan_block`` for any number of books).

    ``add`` writes an entry's bytes and numbers in place (no compiled call); ``flush``
    hashes the entries added since into the lookup table, in one call: until then the
    scanner does not know them (their lines take the reference way)."""

    __slots__ = (
        "_books", "_bytes", "_entries", "_flushed", "_meta", "ent_bytes", "ent_meta", "rows",
        "tab",
    )  # fmt: skip

    def __init__(self, capacity: int = 1024) -> None:
        _load()
        self._alloc(capacity)
        self._books: dict[int, tuple[int, HasRows]] = {}  # id(book) -> (index in rows, book)
        self._entries: dict[bytes, tuple[str, HasRows, int]] = {}  # channel -> name, book, slot
        self._flushed = 0  # entries hashed into tab
        self.rows: tuple[FloatArray, ...] = (_SPARE,) * BOOKS_MAX

    def _alloc(self, capacity: int) -> None:
        self._bytes = bytearray(capacity * 2 * WIDTH)
        self.ent_bytes: ByteArray = np.frombuffer(self._bytes, dtype=np.uint8).reshape(
            capacity, 2 * WIDTH
        )
        self.ent_meta: IntArray = np.zeros((capacity, 4), dtype=np.int64)
        self._meta = memoryview(self.ent_meta).cast("B").cast("q")  # type: ignore[arg-type]
        self.tab: IntArray = np.zeros(2 * capacity, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self.tab[:] = 0
        self._books.clear()
        self._entries.clear()
        self._flushed = 0
        self.rows = (_SPARE,) * BOOKS_MAX

    def refresh(self) -> None:
        """Point at every book's current rows (after a book regrew its array)."""
        rows = list(self.rows)
        for index, book in self._books.values():
            rows[index] = book.row_array
        self.rows = tuple(rows)

    def retain(self, holds: Callable[[str, HasRows, int], bool]) -> None:
        """Keep the entries for which ``holds(name, book, slot)``; forget the others."""
        entries = list(self._entries.items())
        self.clear()
        for channel, (name, book, slot) in entries:
            if holds(name, book, slot):
                self.add(channel, name, book, slot)
        self.flush()

    def flush(self) -> None:
        """Hash the entries added since the last flush into the lookup table."""
        n = len(self._entries)
        if self._flushed < n:
            _insert_range(self.tab, self.ent_bytes, self.ent_meta, self._flushed, n)
            self._flushed = n

    def add(self, channel: bytes, name: str, book: HasRows, slot: int) -> bool:
        """Take lines of ``channel`` carrying instrument ``name`` into ``book``'s row
        ``slot``, from the next ``flush``. False (nothing added) for a channel known
        already, a name or channel longer than ``WIDTH`` bytes (or not ASCII), or a book
        beyond ``BOOKS_MAX``."""
        if len(channel) > WIDTH or len(name) > WIDTH or channel in self._entries:
            return False
        if not name.isascii():
            return False
        got = self._books.get(id(book))
        if got is None:
            if len(self._books) == BOOKS_MAX:
                return False
            got = self._books[id(book)] = (len(self._books), book)
            self.refresh()
        e = len(self._entries)
        if e == self.ent_meta.shape[0]:
            old_bytes, old_meta = self._bytes, self.ent_meta
            self._alloc(2 * e)
            self._bytes[: len(old_bytes)] = old_bytes
            self.ent_meta[:e] = old_meta
            self._flushed = 0  # a new lookup table: every entry hashed again
        off = e * 2 * WIDTH
        self._bytes[off : off + len(channel)] = channel
        self._bytes[off + WIDTH : off + WIDTH + len(name)] = name.encode("ascii")
        meta = self._meta
        meta[4 * e] = len(channel)
        meta[4 * e + 1] = len(name)
        meta[4 * e + 2] = got[0]
        meta[4 * e + 3] = slot
        self._entries[channel] = (name, book, slot)
        return True
