"""The synchronous pipeline: frames -> parser -> books -> trigger -> calibrators -> messages.

Pure and deterministic: no asyncio, no clock of its own (trigger times are the venue's, from
the events), no I/O. Replay drives it inline, frame by frame; the live service drives the
same object from its event loop (the feed adapter parses with ``pipeline.fast``, the book's
fused ticker path, as replay does) and runs the fits (the slow part) in worker threads.

Per (venue, underlying) book there is one ``TriggerPolicy`` and one ``Calibrator`` per
configured model. When a refit is due, every model is fitted on the same snapshot and each
accepted (or degraded) fit becomes a surface message, its tenors message (constant
maturities and the 30-day vol index, ``tenors_messages``) and one greeks message per expiry,
the greeks computed through ``streamer.surface.Surface`` from the very surface payload being
published, so subscribers that rebuild the surface get the same numbers.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import structlog

from streamer.book.book import Book, Books
from streamer.book.fastpath import FastPath
from streamer.book.snapshot import ChainSnapshot, Listing
from streamer.calib.calibrator import CalibConfig, Calibrator, FitResult
from streamer.calib.trigger import TriggerPolicy
from streamer.calib.warmup import warm_up
from streamer.client.surface import Surface, greeks_columns
from streamer.config import DEFAULT_TENORS_DAYS, Config, TriggerConfig
from streamer.errors import ConfigError
from streamer.events import BookChanged, Event, FeedStatus, Quote
from streamer.feeds.deribit.parser import DeribitParser
from streamer.instruments import MS_PER_YEAR, parse_option
from streamer.models import REGISTRY, Model
from streamer.pricing import implied_vol
from streamer.publish.base import decode, encode
from streamer.publish.payloads import (
    CheckedRows,
    greeks_payload,
    greeks_rows,
    surface_payload,
    tenors_payload,
    topic_greeks,
    topic_surface,
    topic_tenors,
)

log = structlog.get_logger(__name__)

Pause = Callable[[], None] | None  # called between steps of the derived topics
_T = TypeVar("_T")
GREEKS_BLOCK = 256  # greeks rows made per step (pause between blocks)
QUALITY_WINDOW = 10_000  # fits per model kept for summaries (a ring: memory stays bounded)
SETTLE_GRACE_S = 1.0  # the refit after a settlement waits this long past 08:00 UTC


class Message:
    """One publication: a topic and its JSON payload; ``clear``: the topic's retained message
    is to be removed (``Publisher.clear_retained``; the payload is then empty).

    ``raw``: the payload's JSON bytes (``streamer.publish.base.encode``) where they were made
    in another process (the derived worker encodes its greeks and tenors: the event loop then
    hands bytes to the publishers instead of unpickling ~120 kB of rows and encoding them
    again); ``payload`` decodes them on first use (JSON's types: NaN is None)."""

    __slots__ = ("_payload", "clear", "raw", "topic")

    def __init__(
        self,
        topic: str,
        payload: dict[str, Any] | None = None,
        clear: bool = False,
        *,
        raw: bytes | None = None,
    ) -> None:
        if payload is not None and raw is not None:
            raise ValueError("a message has a payload or its bytes, not both")
        self.topic = topic
        self.clear = clear
        self.raw = raw
        self._payload = payload if payload is not None or raw is not None else {}

    @property
    def payload(self) -> dict[str, Any]:
        if self._payload is None:
            assert self.raw is not None
            self._payload = decode(self.raw)
        return self._payload

    @property
    def wire(self) -> dict[str, Any] | bytes:
        """What ``Publisher.deliver`` takes: the JSON bytes when they were made elsewhere,
        else the payload."""
        return self.raw if self.raw is not None else self.payload

    def encoded(self) -> Message:
        """The same message with its payload as JSON bytes (``raw``)."""
        if self.raw is not None or self.clear:
            return self
        return Message(self.topic, clear=self.clear, raw=encode(self.payload))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.topic, self.clear, self.payload) == (other.topic, other.clear, other.payload)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {self.payload!r}, clear={self.clear})"

    def __reduce__(self) -> tuple[Any, ...]:
        if self.raw is not None:
            return (_raw_message, (self.topic, self.clear, self.raw))
        return (Message, (self.topic, self._payload, self.clear))


def _raw_message(topic: str, clear: bool, raw: bytes) -> Message:
    return Message(topic, clear=clear, raw=raw)


@dataclass
class FitRecord:
    """What one model's refit produced (for summaries, reports and metrics)."""

    venue: str
    underlying: str
    model: str
    result: FitResult
    snapshot: ChainSnapshot


@dataclass(slots=True)
class FitOutcome:
    """One model's fit of one snapshot before the pipeline counts and numbers it
    (``Pipeline.fit_model`` -> ``Pipeline.accept``): what a fit worker process sends back."""

    model: str
    result: FitResult
    payload: dict[str, Any] | None  # the surface payload (seq 0), None if nothing accepted


@dataclass(slots=True)
class Derived:
    """A surface's derived topics before the pipeline keeps them (``Pipeline.
    derived_compute`` -> ``derived_accept``): what the derived worker process sends back."""

    tenors: list[Message]
    tenors_failed: bool  # the tenors could not be computed (logged where they were)
    # (expiry, payload) per listed expiry; the payload as JSON bytes from ``derived_compute(...,
    # encoded=True)``
    greeks: list[tuple[str, dict[str, Any] | bytes]]


@dataclass
class _Surface:
    calibrator: Calibrator
    seq: int = 0
    last_payload: dict[str, Any] | None = None
    last_problem: str = ""
    # expiry -> the last greeks payload published (stale re-stamps; cleared when it settles)
    greeks: dict[str, dict[str, Any] | bytes] = field(default_factory=dict)


@dataclass
class _Underlying:
    book: Book
    trigger: TriggerPolicy
    surfaces: dict[str, _Surface] = field(default_factory=dict)


@lru_cache(maxsize=65536)
def _expiry_of(name: str) -> str:
    opt = parse_option(name)
    return opt.expiry if opt is not None else ""


def make_model(name: str, options: Mapping[str, Any] | None = None) -> Model:
    """A registered model by name, with its constructor options (e.g. SABR's ``beta``)."""
    cls = REGISTRY[name]
    return cls(**dict(options or {}))


class Pipeline:
    """Parse, book, trigger and fit: the daemon's pure core."""

    def __init__(
        self,
        *,
        models: Sequence[str],
        prefix: str = "streamer",
        trigger: TriggerConfig | None = None,
        calib: Mapping[str, CalibConfig] | None = None,
        model_options: Mapping[str, Mapping[str, Any]] | None = None,
        greeks: bool = True,
        stale_after_s: float = 60.0,
        max_spread_iv: float = 0.5,
        parser: DeribitParser | None = None,
        tenors_days: Sequence[int] = DEFAULT_TENORS_DAYS,
    ) -> None:
        for name in models:
            if name not in REGISTRY:
                raise KeyError(name)
        self.models = tuple(models)
        self.prefix = prefix
        self.trigger_config = trigger or TriggerConfig()
        # per model: the given config, else the model's own defaults (``Model.calib_defaults``)
        given = dict(calib or {})
        self.calib = {m: given.get(m) or CalibConfig.for_model(REGISTRY[m]) for m in models}
        self.model_options = {k: dict(v) for k, v in (model_options or {}).items()}
        self.greeks = greeks
        self.tenors_days = tuple(tenors_days)  # the tenors topic's maturities (() = off)
        self.tenors_failed: Counter[str] = Counter()  # per model: tenors not computed
        self.parser = parser or DeribitParser()
        self.books = Books(stale_after_s=stale_after_s, max_spread_iv=max_spread_iv)
        # frames -> book rows (tickers) or events; the feed adapter parses with this too
        self.fast = FastPath(self.parser, self.books, self._on_write if self.models else None)
        self._under: dict[tuple[str, str], _Underlying] = {}
        self.fits: Counter[str] = Counter()  # per model: fits run
        self.failed: Counter[str] = Counter()  # per model: fits not accepted
        # per model, the last QUALITY_WINDOW accepted fits: (in_band, rmse_iv, elapsed_ms, warm,
        # regime_shift); a ring, so a daemon that runs for months keeps a bounded window
        self.quality: dict[str, deque[tuple[float, float, float, bool, bool]]] = {}
        self.records: list[FitRecord] = []  # every fit (kept only when keep_records)
        self.keep_records = False
        self.feed_state = "disconnected"
        # the feed said "disconnected" after it had been up: what is fitted now is stale
        self.feed_lost = False

    @classmethod
    def from_config(
        cls, config: Config, *, models: Sequence[str] | None = None, greeks: bool | None = None
    ) -> Pipeline:
        """The pipeline ``config`` describes (``models``/``greeks`` override its choices);
        ``ConfigError`` (key ``models.names[i]``) for a model that is not registered."""
        names = list(config.models.names if models is None else models)
        for i, name in enumerate(names):
            if name not in REGISTRY:
                allowed = ", ".join(sorted(REGISTRY))
                raise ConfigError(
                    f"models.names[{i}]", f"unknown model {name!r}; allowed: {allowed}"
                )
        return cls(
            models=names,
            prefix=config.publish.prefix,
            trigger=config.trigger,
            calib={
                m: CalibConfig.for_model(REGISTRY[m], config.models.calib_overrides(m))
                for m in names
            },
            model_options=config.models.options(),
            greeks=config.publish.greeks if greeks is None else greeks,
            stale_after_s=config.book.stale_after_s,
            max_spread_iv=config.book.max_spread_iv,
            tenors_days=config.publish.tenors_days,
        )

    def warm_up(self) -> float:
        """Load (or compile) the numba kernels of every configured model: a fit of a small
        synthetic chain each (``streamer.calib.warmup``); returns the seconds it took."""
        return warm_up(make_model(name, self.model_options.get(name)) for name in self.models)

    # ------------------------------------------------------------------ input
    def on_frame(self, frame: str | bytes, recv_ns: int) -> Sequence[Event]:
        """Parse one raw frame (the fused path) and apply its events; returns the events."""
        events = self.fast.parse(frame, recv_ns)
        for ev in events:
            self.on_event(ev)
        return events

    def on_event(self, event: Event) -> Book | None:
        """Apply one normalized event to the books and the trigger of its underlying; the
        book whose quotes changed, else None."""
        if type(event) is BookChanged:  # the fused path wrote it and told the trigger
            return self.books.get(event.venue, event.underlying)
        if type(event) is FeedStatus and not event.instrument:
            self.feed_state = event.state
            if event.state == "connected":
                self.feed_lost = False
            elif event.state == "disconnected":
                self.feed_lost = True
        book = self.books.on_event(event)
        if self.models == ():
            return book
        if book is None:  # an unchanged quote may still carry a forward that moved
            if type(event) is Quote:
                route = self.books.route(event.venue, event.instrument)
                if route is not None and self._underlying(route[0]).trigger.on_forward(
                    _expiry_of(event.instrument), event.forward
                ):
                    return route[0]
            return None
        u = self._underlying(book)
        if type(event) is Quote:
            u.trigger.on_quote(_expiry_of(event.instrument), event.forward)
        else:
            u.trigger.on_quote("", math.nan)
        return book

    def _on_write(self, book: Book, slot: int, forward: float, changed: bool) -> bool:
        """A ticker went straight into ``book`` (the fused path): tell its trigger; True when
        the book changed for the trigger (a changed quote, or a forward moved far enough)."""
        trigger = self._underlying(book).trigger
        if changed:
            trigger.on_quote(book.expiry_of(slot), forward)
            return True
        return trigger.on_forward(book.expiry_of(slot), forward)

    def _underlying(self, book: Book) -> _Underlying:
        key = (book.venue, book.underlying)
        u = self._under.get(key)
        if u is None:
            u = _Underlying(book=book, trigger=TriggerPolicy(self.trigger_config))
            for name in self.models:
                model = make_model(name, self.model_options.get(name))
                u.surfaces[name] = _Surface(Calibrator(model, self.calib.get(name)))
            self._under[key] = u
        return u

    # --------------------------------------------------------------- triggers
    def due(self, now_s: float) -> list[Book]:
        """Books whose refit is due at ``now_s`` (venue seconds in replay)."""
        return [u.book for u in self._under.values() if u.trigger.due(now_s)]

    def is_due(self, book: Book, now_s: float) -> bool:
        """Is a refit of ``book`` due at ``now_s``?"""
        return self._underlying(book).trigger.due(now_s)

    def pending(self) -> list[Book]:
        """Books with changes not yet fitted (end of a replay: one last fit each)."""
        return [u.book for u in self._under.values() if u.trigger.changed > 0]

    def take_snapshot(self, book: Book, now_s: float) -> ChainSnapshot:
        """Snapshot ``book`` and mark the trigger fitted (call on the event loop)."""
        u = self._underlying(book)
        # the receive clock lets the first fresh quotes after a gap count at once (book docs)
        snap = book.snapshot(recv_ms=self.fast.last_recv_ns // 1_000_000)
        listed = snap.listing.expiry_ms if snap.listing is not None else snap.expiry_ms
        # refit once the next expiry has settled (its topics go), in the trigger's clock
        wake = (
            (int(listed.min()) - snap.ts_ms) / 1000.0 + now_s + SETTLE_GRACE_S
            if len(listed)
            else math.inf
        )
        u.trigger.fitted(now_s, dict(zip(snap.expiries, snap.forwards.tolist(), strict=True)), wake)
        return snap

    def resnapshot(self, book: Book) -> ChainSnapshot:
        """Snapshot ``book`` as it is now, the trigger untouched (a fit job that starts after
        the book changed since the snapshot of its trigger fits the newest quotes instead;
        the changes stay counted towards the next trigger)."""
        return book.snapshot(recv_ms=self.fast.last_recv_ns // 1_000_000)

    # -------------------------------------------------------------------- fit
    def fit_snapshot(
        self,
        snap: ChainSnapshot,
        *,
        derived: bool = True,
        models: Sequence[str] | None = None,
    ) -> list[Message]:
        """Fit every model (or those in ``models``) on ``snap`` and build the messages.

        Safe in worker threads, one per model at a time (each model keeps its own state).
        ``derived=False`` leaves the derived topics out, the tenors and the greeks (the service
        publishes the surfaces first and builds those with ``derived_for`` right after, so a
        surface's tick-to-publish carries the fit only). The same as ``accept(fit_model(...))``
        per model: the service runs ``fit_model`` in a worker process (``streamer.daemon.
        fitproc``) and ``accept`` on its event loop.
        """
        out: list[Message] = []
        for name in self._under[(snap.venue, snap.underlying)].surfaces:
            if models is not None and name not in models:
                continue
            out.extend(self.accept(snap, self.fit_model(snap, name), derived=derived))
        return out

    def fit_model(self, snap: ChainSnapshot, model: str) -> FitOutcome:
        """Fit ``model`` on ``snap`` (its calibrator's warm state moves on) and build its
        surface payload, without the bookkeeping (``accept``: counters, seq, logs). Pure
        compute: what a fit worker process runs (its own pipeline, one model)."""
        book = self.books.book(snap.venue, snap.underlying, inverse=snap.inverse)
        result = self._underlying(book).surfaces[model].calibrator.fit(snap)
        payload = self.surface_message(snap, model, result, 0) if result.slices else None
        return FitOutcome(model, result, payload)

    def accept(
        self, snap: ChainSnapshot, outcome: FitOutcome, *, derived: bool = False
    ) -> list[Message]:
        """Count, log and number one fit of ``snap`` (``fit_model``, here or in a worker
        process) and return its messages: its surface (none before a fit was accepted) and,
        with ``derived``, its tenors and greeks."""
        name, result = outcome.model, outcome.result
        surf = self._under[(snap.venue, snap.underlying)].surfaces[name]
        self.fits[name] += 1
        if not result.success:
            self.failed[name] += 1
            # warn when the reason changes; repeats of the same reason go to debug
            level = log.debug if result.message == surf.last_problem else log.warning
            surf.last_problem = result.message
            level(
                "fit_not_accepted",
                venue=snap.venue,
                underlying=snap.underlying,
                model=name,
                message=result.message,
                failed=self.failed[name],
            )
        else:
            surf.last_problem = ""
            self.quality.setdefault(name, deque(maxlen=QUALITY_WINDOW)).append(
                (
                    result.in_band,
                    result.rmse_iv,
                    result.elapsed_ms,
                    result.warm,
                    result.regime_shift,
                )
            )
        if self.keep_records:
            self.records.append(FitRecord(snap.venue, snap.underlying, name, result, snap))
        if outcome.payload is None:
            return []  # nothing accepted yet: nothing to publish
        surf.seq += 1
        payload = outcome.payload
        payload["seq"] = surf.seq
        if self.feed_lost:  # the feed went away after the snapshot: what is fitted is stale
            payload["status"] = "stale"
        surf.last_payload = payload
        out = [Message(topic_surface(self.prefix, snap.venue, snap.underlying, name), payload)]
        if derived:
            out.extend(self.derived_messages(snap, payload))
        return out

    def derived_for(
        self, snap: ChainSnapshot, surfaces: list[Message], pause: Pause = None
    ) -> list[Message]:
        """The tenors and greeks messages of surface messages ``fit_snapshot`` made from
        ``snap`` with ``derived=False``. ``pause``, when given, is called between steps of a
        millisecond or so (each tenor, the greeks' passes): the service's derived thread
        waits there while surface fits are in flight (the same messages either way)."""
        out: list[Message] = []
        for msg in surfaces:
            if msg.topic.endswith("/surface"):
                out.extend(self.derived_messages(snap, msg.payload, pause))
        return out

    def with_derived(self, snap: ChainSnapshot, surfaces: Sequence[Message]) -> list[Message]:
        """Surface messages of ``snap`` (``fit_snapshot(..., derived=False)``), each followed
        by its derived topics: what ``fit_snapshot`` makes with them."""
        out: list[Message] = []
        for msg in surfaces:
            out.append(msg)
            out.extend(self.derived_messages(snap, msg.payload))
        return out

    def derived_messages(
        self, snap: ChainSnapshot, payload: Mapping[str, Any], pause: Pause = None
    ) -> list[Message]:
        """What follows a surface message: its tenors message, then (``greeks``) its greeks."""
        return self.derived_accept(snap, payload, self.derived_compute(snap, payload, pause))

    def derived_compute(
        self,
        snap: ChainSnapshot,
        payload: Mapping[str, Any],
        pause: Pause = None,
        *,
        encoded: bool = False,
    ) -> Derived:
        """The tenors and greeks of a surface payload, without the pipeline's state (what
        the service's derived process runs; ``derived_accept`` numbers the greeks topics
        and clears those of expiries gone). ``encoded``: every payload as its JSON bytes
        (a worker process: the parent publishes the bytes as they are)."""
        model = str(payload["model"])
        before = self.tenors_failed[model]
        tenors = self.tenors_messages(payload, pause)
        bodies = self.greeks_bodies(snap, payload, pause) if self.greeks else []
        greeks: list[tuple[str, dict[str, Any] | bytes]] = list(bodies)
        if encoded:
            tenors = [m.encoded() for m in tenors]
            greeks = [(expiry, encode(body)) for expiry, body in bodies]
        return Derived(tenors, self.tenors_failed[model] > before, greeks)

    def derived_accept(
        self, snap: ChainSnapshot, payload: Mapping[str, Any], derived: Derived
    ) -> list[Message]:
        """``derived_compute``'s messages: the tenors, the greeks of every listed expiry (kept
        for the stale re-stamps), and a clear of each greeks topic no longer listed."""
        out = list(derived.tenors)
        if self.greeks:
            out.extend(self.greeks_accept(snap, str(payload["model"]), derived.greeks))
        return out

    def fit_book(self, book: Book, now_s: float) -> list[Message]:
        """Snapshot and fit in one go, derived topics included (``fit_snapshot``)."""
        return self.fit_snapshot(self.take_snapshot(book, now_s))

    def stale_messages(self) -> list[Message]:
        """Every last surface and its greeks re-stamped ``stale`` (the feed went away)."""
        out = []
        for (venue, under), u in self._under.items():
            for name, surf in u.surfaces.items():
                if surf.last_payload is None:
                    continue
                surf.seq += 1
                payload = dict(surf.last_payload, status="stale", seq=surf.seq)
                surf.last_payload = payload
                out.append(Message(topic_surface(self.prefix, venue, under, name), payload))
                out.extend(self.tenors_messages(payload))
                for expiry, greeks in surf.greeks.items():
                    body = decode(greeks) if isinstance(greeks, bytes) else greeks
                    restamped = dict(body, status="stale", seq=surf.seq)
                    surf.greeks[expiry] = restamped
                    topic = topic_greeks(self.prefix, venue, under, name, expiry)
                    out.append(Message(topic, restamped))
        return out

    # ---------------------------------------------------------------- payloads
    def surface_message(
        self, snap: ChainSnapshot, model: str, result: FitResult, seq: int
    ) -> dict[str, Any]:
        """The ``streamer.surface/1`` payload of one fit."""
        payload = surface_payload(
            venue=snap.venue,
            underlying=snap.underlying,
            model=model,
            ts_ms=snap.ts_ms,
            seq=seq,
            status="stale" if self.feed_lost else "ok" if result.status == "ok" else "degraded",
            reason="" if result.status == "ok" else result.message,
            fit={
                "rmse_iv": result.rmse_iv,
                "in_band": result.in_band,
                "n_quotes": result.n_quotes,
                "nfev": result.nfev,
                "elapsed_ms": result.elapsed_ms,
                "warm": result.warm,
                "regime_shift": result.regime_shift,
                "penalty": result.penalty,
            },
            params=result.params,
            expiries=[
                {
                    "expiry": s.expiry,
                    "expiry_ms": s.expiry_ms,
                    "T": s.T,
                    "forward": s.forward,
                    "atm_iv": s.atm_iv,
                    "params": s.params,
                    "rmse_iv": s.rmse_iv,
                    "in_band": s.in_band,
                    "n_quotes": s.n_quotes,
                }
                for s in result.slices
            ],
        )
        return dict(payload)

    def tenors_messages(self, payload: Mapping[str, Any], pause: Pause = None) -> list[Message]:
        """The tenors message of a surface payload (``streamer.tenors/1``: the surface's seq
        and status; ``streamer.client.tenors``); none when ``tenors_days`` is empty. A
        failure is logged and counted in ``tenors_failed``, never raised."""
        if not self.tenors_days:
            return []
        model = str(payload["model"])
        try:
            surface = Surface.from_payload(payload)
            body = tenors_payload(
                ts_ms=int(payload["ts_ms"]),
                seq=int(payload["seq"]),
                status=payload["status"],
                vol_index_30d=surface.vol_index(),
                tenors=[_paused(pause, surface.tenor, d).as_dict() for d in self.tenors_days],
            )
        except (ValueError, ArithmeticError, KeyError, IndexError) as exc:
            self.tenors_failed[model] += 1
            log.warning(
                "tenors_failed", model=model, error=repr(exc), failed=self.tenors_failed[model]
            )
            return []
        topic = topic_tenors(self.prefix, payload["venue"], payload["underlying"], model)
        return [Message(topic, dict(body))]

    def greeks_accept(
        self,
        snap: ChainSnapshot,
        model: str,
        bodies: Sequence[tuple[str, dict[str, Any] | bytes]],
    ) -> list[Message]:
        """The greeks messages of ``bodies`` (expiry, payload or its JSON bytes), each kept for
        the stale re-stamps, then a clear of every greeks topic whose expiry is no longer
        listed."""
        surf = self._under[(snap.venue, snap.underlying)].surfaces[model]
        out: list[Message] = []
        for expiry, body in bodies:
            surf.greeks[expiry] = body
            topic = topic_greeks(self.prefix, snap.venue, snap.underlying, model, expiry)
            out.append(
                Message(topic, raw=body) if isinstance(body, bytes) else Message(topic, body)
            )
        listed = {expiry for expiry, _ in bodies}
        for expiry in [e for e in surf.greeks if e not in listed]:  # settled or delisted
            del surf.greeks[expiry]
            topic = topic_greeks(self.prefix, snap.venue, snap.underlying, model, expiry)
            out.append(Message(topic, {}, clear=True))
        return out

    def greeks_bodies(
        self, snap: ChainSnapshot, payload: Mapping[str, Any], pause: Pause = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """One greeks payload per listed expiry: every live instrument of it, the fitted
        expiries from their slices, the others from the surface around them (``fitted``
        false).

        The model IVs are made expiry by expiry; prices, Greeks, market IVs and the rows of
        every instrument in one pass over the whole listing (numpy columns), the rows in
        blocks of ``GREEKS_BLOCK`` (``pause`` between steps: ``derived_for``)."""
        surface = Surface.from_payload(payload)
        listing = snap.listing or listing_of(snap)
        n = listing.n_instruments
        F, T = np.full(n, math.nan), np.full(n, math.nan)
        iv = np.full(n, math.nan)
        fitted = np.zeros(len(listing.expiries), dtype=bool)
        where: list[tuple[int, np.ndarray, float, float]] = []  # expiry, its rows, F, T
        for e, expiry in enumerate(listing.expiries):
            rows = np.flatnonzero(listing.expiry_idx == e)
            if not rows.size:
                continue
            if pause is not None and e % 4 == 3:
                pause()
            K, calls = listing.strike[rows], listing.is_call[rows]
            if expiry in surface.expiries:
                j = surface.expiries.index(expiry)
                F_e, T_e = float(surface.forward[j]), float(surface.T[j])
                iv[rows] = surface.iv(K, expiry)
                fitted[e] = True
            else:
                T_e = (int(listing.expiry_ms[e]) - snap.ts_ms) / MS_PER_YEAR
                if not T_e > 0.0:
                    continue
                F_e = float(listing.forwards[e])
                if not (math.isfinite(F_e) and F_e > 0.0):
                    F_e = surface.forward_at(T_e)
                iv[rows] = surface.iv_at(K, T_e, F_e)
            F[rows], T[rows] = F_e, T_e
            where.append((e, rows, F_e, T_e))
        out: list[tuple[str, dict[str, Any]]] = []
        if where:
            sel = np.concatenate([rows for _, rows, _, _ in where])  # expiry by expiry
            K, calls = listing.strike[sel], listing.is_call[sel]
            Fs, Ts = F[sel], T[sel]
            _paused(pause)
            g = greeks_columns(Fs, K, Ts, iv[sel], calls, inverse=snap.inverse)
            unit = Fs if snap.inverse else 1.0
            g["bid_iv"] = _market_iv(listing.bid_iv[sel], listing.bid[sel] * unit, Fs, K, Ts, calls)
            g["ask_iv"] = _market_iv(listing.ask_iv[sel], listing.ask[sel] * unit, Fs, K, Ts, calls)
            g["mark_iv"] = listing.mark_iv[sel]
            names = [listing.instrument[i] for i in sel.tolist()]
            rows_all: list[Any] = []
            for lo in range(0, len(names), GREEKS_BLOCK):  # rows are row by row: same rows
                _paused(pause)
                hi = lo + GREEKS_BLOCK
                rows_all.extend(
                    greeks_rows(
                        instruments=names[lo:hi],
                        strikes=K[lo:hi],
                        is_call=calls[lo:hi],
                        **{name: col[lo:hi] for name, col in g.items()},
                    )
                )
            _paused(pause)
            lo = 0
            for e, rows, F_e, T_e in where:
                expiry = listing.expiries[e]
                hi = lo + rows.size
                body = dict(
                    greeks_payload(
                        ts_ms=int(payload["ts_ms"]),
                        seq=int(payload["seq"]),
                        status=payload["status"],
                        expiry=expiry,
                        forward=F_e,
                        T=T_e,
                        fitted=bool(fitted[e]),
                        instruments=CheckedRows(rows_all[lo:hi]),
                    )
                )
                lo = hi
                out.append((expiry, body))
        return out

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        drops: Counter[str] = Counter()
        for b in self.books:
            drops.update(b.drops)
        return {
            "frames": self.parser.frames,
            "parse_drops": dict(self.parser.drops),
            "book_drops": dict(drops),
            "fits": dict(self.fits),
            "failed": dict(self.failed),
        }


def _paused(pause: Pause, fn: Callable[..., _T] | None = None, *args: Any) -> Any:
    """Call ``pause`` (if any), then ``fn(*args)`` (if any)."""
    if pause is not None:
        pause()
    return fn(*args) if fn is not None else None


def _market_iv(
    venue_iv: np.ndarray,
    price_usd: np.ndarray,
    F: np.ndarray,
    K: np.ndarray,
    T: np.ndarray,
    calls: Any,
) -> np.ndarray:
    """The book's IV of one side: the venue's where sent, else implied from the price."""
    mine = np.asarray(implied_vol(price_usd, F, K, T, calls), dtype=np.float64)
    return np.where(np.isfinite(venue_iv) & (venue_iv > 0), venue_iv, mine)


def run_inline(
    pipeline: Pipeline, items: Iterable[tuple[int, str | bytes | Event]]
) -> Iterator[list[Message]]:
    """Drive ``pipeline`` over recorded frames (or events), fitting inline when due.

    Yields the message batch of each refit: every model's surface, each followed by its
    derived topics (``with_derived``). The clock is the items' receive time, so a replay makes
    the same fits every time; at the end every book with unfitted changes gets one last fit.
    ``step`` and ``finish`` are the two halves (a paced replay awaits between steps);
    ``fits_inline`` the same fits with the derived topics left to the caller.
    """
    for snap, surfaces in fits_inline(pipeline, items):
        yield pipeline.with_derived(snap, surfaces)


def fits_inline(
    pipeline: Pipeline, items: Iterable[tuple[int, str | bytes | Event]]
) -> Iterator[tuple[ChainSnapshot, list[Message]]]:
    """``run_inline``'s fits: each snapshot and its surface messages, no derived topics
    (``streamer.daemon.derived_pool`` builds them in worker processes)."""
    now_s = 0.0
    for ts_ns, item in items:
        now_s = ts_ns / 1e9
        yield from _step_fits(pipeline, ts_ns, item)
    yield from _final_fits(pipeline, now_s)


def step(pipeline: Pipeline, ts_ns: int, item: str | bytes | Event) -> Iterator[list[Message]]:
    """Apply one recorded frame (or event) received at ``ts_ns``; the refits now due."""
    for snap, surfaces in _step_fits(pipeline, ts_ns, item):
        yield pipeline.with_derived(snap, surfaces)


def finish(pipeline: Pipeline, now_s: float) -> Iterator[list[Message]]:
    """The end of a replay: one last fit of every book with unfitted changes."""
    for snap, surfaces in _final_fits(pipeline, now_s):
        yield pipeline.with_derived(snap, surfaces)


def _step_fits(
    pipeline: Pipeline, ts_ns: int, item: str | bytes | Event
) -> Iterator[tuple[ChainSnapshot, list[Message]]]:
    if isinstance(item, str | bytes):
        pipeline.on_frame(item, ts_ns)
    else:
        pipeline.on_event(item)
    now_s = ts_ns / 1e9
    for book in pipeline.due(now_s):
        yield _fit_surfaces(pipeline, book, now_s)


def _final_fits(pipeline: Pipeline, now_s: float) -> Iterator[tuple[ChainSnapshot, list[Message]]]:
    for book in pipeline.pending():
        yield _fit_surfaces(pipeline, book, now_s)


def _fit_surfaces(
    pipeline: Pipeline, book: Book, now_s: float
) -> tuple[ChainSnapshot, list[Message]]:
    """``book``'s snapshot now and its surface messages (no derived topics yet)."""
    snap = pipeline.take_snapshot(book, now_s)
    return snap, pipeline.fit_snapshot(snap, derived=False)


def listing_of(snap: ChainSnapshot) -> Listing:
    """A snapshot's own quotes as its listing (snapshots made without a book: chain files)."""
    return Listing(
        instrument=snap.instrument,
        expiry_idx=snap.expiry_idx,
        strike=snap.strike,
        is_call=snap.is_call,
        bid=snap.bid,
        ask=snap.ask,
        bid_iv=snap.bid_iv,
        ask_iv=snap.ask_iv,
        mark_iv=snap.mark_iv,
        expiries=snap.expiries,
        expiry_ms=snap.expiry_ms,
        forwards=snap.forwards,
    )
