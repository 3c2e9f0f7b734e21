"""Refits on real change only, and every model in its own job (issue: speed where users wait).

* A ticker that changes no side, size or bid/ask IV (Deribit re-sends every option every
  100 ms with a new time, mark and forward) triggers nothing: no fit, on the fused path and on
  the event path alike, even past the trigger's max interval.
* Each model of an underlying fits in its own job and publishes as soon as it is done: a slow
  model never delays another's surface; ``streamer_fit_seconds{model}`` counts each model's
  own fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import structlog

from streamer.config import Config, TriggerConfig, load_config
from streamer.daemon import service as service_module
from streamer.daemon.pipeline import Pipeline, run_inline
from streamer.daemon.service import Service
from streamer.events import Heartbeat
from streamer.feeds.recordings.replay_feed import ReplayFeed
from streamer.publish.memory import MemoryPublisher
from tests.conftest import UNIT
from tests.synth import deribit_chain, make_chain, svi_surface, ticker_frame

NOW_MS = 1_893_484_800_000 + 3_600_000  # 2030-01-01 09:00 UTC
TRIGGER = TriggerConfig(min_changed_quotes=5, max_interval_s=1.0, min_interval_s=0.5, warmup_s=0.0)


def tickers(ts_ms: int, seed: int = 1) -> list[dict[str, Any]]:
    _, fn = svi_surface(days=(7, 30, 91))
    snap = make_chain(fn, days=(7, 30, 91), ts_ms=ts_ms, rng=np.random.default_rng(seed))
    return deribit_chain(snap)[1]


def resent(ts: list[dict[str, Any]], dt_ms: int) -> list[dict[str, Any]]:
    """The same quotes re-sent ``dt_ms`` later with a new mark and forward (as Deribit does)."""
    return [
        dict(
            t,
            timestamp=int(t["timestamp"]) + dt_ms,
            mark_price=float(t["mark_price"]) * 1.001,
            underlying_price=float(t["underlying_price"]) + 1.0,
        )
        for t in ts
    ]


@pytest.mark.parametrize("path", ["frames", "events"])
def test_unchanged_tickers_trigger_no_fit(path: str) -> None:
    pipe = Pipeline(models=["svi"], trigger=TRIGGER)
    first = tickers(NOW_MS)

    def items(rounds: list[list[dict[str, Any]]], t0_ms: int) -> Any:
        for r, ts in enumerate(rounds):
            ns = (t0_ms + 1000 * r) * 1_000_000
            for t in ts:
                frame = ticker_frame(t)
                yield (ns, frame) if path == "frames" else (ns, pipe.parser.parse(frame, ns)[0])

    list(run_inline(pipe, items([first], NOW_MS)))
    fitted = pipe.fits["svi"]
    assert fitted >= 1 and pipe.failed["svi"] < fitted  # the chain arrived and was fitted
    # five more seconds of the same quotes re-sent (new time, mark, forward): nothing
    again = [resent(first, 1000 * r) for r in range(1, 6)]
    assert not [b for b in run_inline(pipe, items(again, NOW_MS + 1000)) if b]
    assert pipe.fits["svi"] == fitted
    # the quotes stay, but the forward moves 30 bp (beyond forward_move_bp): a refit
    shifted = [
        dict(t, underlying_price=float(t["underlying_price"]) * 1.003) for t in resent(first, 1)
    ]
    assert [b for b in run_inline(pipe, items([shifted], NOW_MS + 7000)) if b]
    assert pipe.fits["svi"] == fitted + 1
    fitted += 1
    # a few bids really move: refits again
    moved = [dict(t, best_bid_price=float(t["best_bid_price"]) * 0.98) for t in first[:5]]
    assert [b for b in run_inline(pipe, items([moved], NOW_MS + 9000)) if b]
    assert pipe.fits["svi"] > fitted


def _recording(tmp_path: Path, rounds: int) -> Path:
    """A recording of ``rounds`` re-quotes of the test chain, 500 ms apart."""
    rec = tmp_path / "rec.jsonl"
    with rec.open("w") as fh:
        for r in range(rounds):
            for t in tickers(NOW_MS + 500 * r, seed=r):
                fh.write(json.dumps({"ts_ns": 0, "venue": "deribit", "frame": ticker_frame(t)}))
                fh.write("\n")
    return rec


def _config(models: tuple[str, ...], workers: Literal["process", "thread"] = "process") -> Config:
    """The default config with these models and a trigger quick enough for a short replay
    (``workers="thread"``: fits in the service's threads, where a test can slow one down)."""
    cfg = load_config(None)
    return dataclasses.replace(
        cfg,
        instance="jobs",
        models=dataclasses.replace(cfg.models, names=models, workers=workers),
        trigger=dataclasses.replace(
            cfg.trigger, min_changed_quotes=20, min_interval_s=0.05, warmup_s=0.05
        ),
    )


def _replaying(cfg: Config, rec: Path, mem: MemoryPublisher, rate: float) -> Service:
    """A service replaying ``rec`` at ``rate`` frames a second into ``mem``."""
    return Service(
        cfg,
        feed_factory=lambda c, p, f: ReplayFeed([str(rec)], parser=p, rate=rate),
        publishers=[mem],
    )


def _fit_counts(service: Service) -> dict[str, float]:
    """``streamer_fit_seconds_count`` per model label."""
    out: dict[str, float] = {}
    for line in service.metrics.render().splitlines():
        if line.startswith("streamer_fit_seconds_count"):
            model = line.split('model="', 1)[1].split('"', 1)[0]
            out[model] = float(line.rsplit(" ", 1)[1])
    return out


async def test_a_slow_model_never_delays_another(tmp_path: Path) -> None:
    """SSVI made slow (each fit sleeps in its worker thread): SVI keeps publishing while an
    SSVI fit is in flight, and each model's fits are counted under its own label."""
    rec = _recording(tmp_path, 8)
    cfg = _config(("svi", "ssvi"), workers="thread")
    mem = MemoryPublisher()
    published: list[tuple[float, str]] = []
    original = mem.publish

    async def timed(topic: str, payload: Any, *, retain: bool = True) -> None:
        if topic.endswith("/surface") and payload["status"] != "stale":  # fitted, not re-stamped
            published.append((time.monotonic(), topic.split("/")[-2]))
        await original(topic, payload, retain=retain)

    mem.publish = timed  # type: ignore[method-assign]
    service = _replaying(cfg, rec, mem, 600.0)
    slow_s = 1.5 * UNIT

    async def run() -> int:
        task = asyncio.create_task(service.run(signals=False))
        await service.ready.wait()
        return await task

    # make every SSVI fit slow, once the pipeline has built its calibrators
    real_underlying = service.pipeline._underlying

    def patched(book: Any) -> Any:
        u = real_underlying(book)
        cal = u.surfaces["ssvi"].calibrator
        if not getattr(cal, "_slowed", False):
            real_fit = cal.fit

            def slow_fit(snap: Any) -> Any:
                time.sleep(slow_s)
                return real_fit(snap)

            cal.fit = slow_fit  # type: ignore[method-assign,assignment]
            cal._slowed = True  # type: ignore[attr-defined]
        return u

    service.pipeline._underlying = patched  # type: ignore[method-assign]
    assert await asyncio.wait_for(run(), 60 * UNIT) == 0
    svi = [t for t, m in published if m == "svi"]
    slow = [t for t, m in published if m == "ssvi"]
    assert slow and svi
    # SVI surfaces went out before the first (slow) SSVI surface and between SSVI surfaces
    assert sum(t < slow[0] for t in svi) >= 2
    assert _fit_counts(service) == {"svi": len(svi), "ssvi": len(slow)}


async def test_tenors_and_greeks_wait_for_the_surfaces_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A surface's tenors and greeks (milliseconds of Python holding the GIL) are built once
    the other jobs' fits in flight have published their surfaces: with an SSVI fit held in
    its thread, SVI's surface goes out at once, but its tenors and greeks only after the
    SSVI surface (they used to take the GIL from the fit right away)."""
    monkeypatch.setattr(service_module, "DERIVED_YIELD_S", 60 * UNIT)
    rec = _recording(tmp_path, 4)
    cfg = _config(("svi", "ssvi"), workers="thread")
    mem = MemoryPublisher()
    order: list[tuple[str, str]] = []  # (model, kind) of every fitted message, in order
    original = mem.publish
    held = threading.Event()
    loop = asyncio.get_running_loop()

    async def logged(topic: str, payload: Any, *, retain: bool = True) -> None:
        parts = topic.split("/")
        fitted = bool(payload) and payload.get("status") != "stale"
        if fitted and ("greeks" in parts or parts[-1] in ("surface", "tenors")):
            kind = "greeks" if "greeks" in parts else parts[-1]
            model = parts[-3] if kind == "greeks" else parts[-2]
            if (model, kind) == ("svi", "surface") and not held.is_set():
                loop.call_later(0.5 * UNIT, held.set)  # long after SVI's fit is done
            order.append((model, kind))
        await original(topic, payload, retain=retain)

    mem.publish = logged  # type: ignore[method-assign]
    service = _replaying(cfg, rec, mem, 600.0)
    real_underlying = service.pipeline._underlying

    def patched(book: Any) -> Any:
        u = real_underlying(book)
        cal = u.surfaces["ssvi"].calibrator
        if not getattr(cal, "_held", False):
            real_fit = cal.fit

            def held_fit(snap: Any) -> Any:
                assert held.wait(30 * UNIT)
                return real_fit(snap)

            cal.fit = held_fit  # type: ignore[method-assign,assignment]
            cal._held = True  # type: ignore[attr-defined]
        return u

    service.pipeline._underlying = patched  # type: ignore[method-assign]
    assert await asyncio.wait_for(service.run(signals=False), 60 * UNIT) == 0
    first = {item: order.index(item) for item in set(order)}
    assert first[("svi", "surface")] < first[("ssvi", "surface")]
    assert first[("ssvi", "surface")] < first[("svi", "tenors")] < first[("svi", "greeks")]


async def test_a_killed_fit_process_is_replaced_and_the_other_models_publish_on(
    tmp_path: Path,
) -> None:
    """Fits in worker processes (the default): SSVI's process killed (as the OOM killer
    would) after its first surface; SVI's surfaces keep coming, the loss is logged and
    counted, and a fresh SSVI process publishes again; each model's fits are counted under
    its own label, in the service's process."""
    rec = _recording(tmp_path, 12)
    cfg = _config(("svi", "ssvi"))
    mem = MemoryPublisher()
    published: list[tuple[float, str]] = []
    killed: list[float] = []
    original = mem.publish
    service: Service | None = None

    async def timed(topic: str, payload: Any, *, retain: bool = True) -> None:
        if topic.endswith("/surface") and payload["status"] != "stale":
            model = topic.split("/")[-2]
            published.append((time.monotonic(), model))
            if model == "ssvi" and not killed and service is not None:
                worker = service._jobs[("deribit", "BTC")]["ssvi"].worker
                assert worker is not None and worker.pid is not None
                os.kill(worker.pid, signal.SIGKILL)
                killed.append(time.monotonic())
        await original(topic, payload, retain=retain)

    mem.publish = timed  # type: ignore[method-assign]
    service = _replaying(cfg, rec, mem, 300.0)
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(service.run(signals=False), 120 * UNIT) == 0
    assert killed
    worker = service._jobs[("deribit", "BTC")]["ssvi"].worker
    assert worker is not None and worker.restarts == 1
    lost = [e for e in logs if e["event"] == "fit_worker_lost"]
    assert [e["model"] for e in lost] == ["ssvi"] and lost[0]["exit_code"] == -signal.SIGKILL
    after = [m for t, m in published if t > killed[0]]
    assert "svi" in after and "ssvi" in after  # SVI went on; a fresh SSVI process fitted
    assert service._jobs[("deribit", "BTC")]["svi"].worker.restarts == 0  # type: ignore[union-attr]
    assert _fit_counts(service) == {m: sum(p == m for _, p in published) for m in ("svi", "ssvi")}


def _bids(snap: Any) -> dict[str, float]:
    return dict(zip(snap.instrument, snap.bid.tolist(), strict=True))


def test_a_job_that_picks_up_stale_work_fits_the_book_as_it_is_now() -> None:
    """A snapshot handed to a busy job (latest wins) is as old as the job's queue: when the job
    picks it up after the book changed, it fits a fresh snapshot (the newest quotes, measured
    from the newest frame); a snapshot it picks up at once, or of a book that did not change,
    is fitted as it is."""
    cfg = load_config(None)
    cfg = dataclasses.replace(
        cfg,
        models=dataclasses.replace(cfg.models, names=("svi",)),
        trigger=dataclasses.replace(
            cfg.trigger, min_changed_quotes=1, min_interval_s=0.0, warmup_s=0.0
        ),
    )
    service = Service(cfg, publishers=[MemoryPublisher()])
    p = service.pipeline
    job = service_module._Job("svi")
    service._jobs[("deribit", "BTC")] = {"svi": job}  # the job, without its worker task
    first = tickers(NOW_MS)
    moved = [dict(t, best_bid_price=round(float(t["best_bid_price"]) * 0.9, 8)) for t in first]
    ns = time.time_ns()

    def feed(ts: list[dict[str, Any]], t0_ns: int) -> int:
        for i, t in enumerate(ts):
            for ev in p.fast.parse(ticker_frame(t), t0_ns + i):
                service._on_event(ev)
        return t0_ns + len(ts) - 1  # the receive time of the last frame

    last0 = feed(first, ns)
    book = p.books.get("deribit", "BTC")
    assert book is not None and job.snap is not None  # the trigger handed the job a snapshot
    handed = job.snap
    want0 = {str(t["instrument_name"]): float(t["best_bid_price"]) for t in first}
    assert _bids(handed) == {k: want0[k] for k in handed.instrument}
    # picked up at once: that very snapshot, measured from the last frame
    work = service._take(book, job)
    assert work is not None and work[0] is handed and work[1] == last0 and not work[3]
    # the job is busy while the whole chain is re-quoted: the trigger hands it nothing
    job.busy = True
    last1 = feed(moved, ns + 10_000)
    assert job.snap is None
    job.busy = False
    # its next trigger's snapshot waits while the job is (again) busy; the book moves on
    job.busy = True
    service._jobs[("deribit", "BTC")]["other"] = service_module._Job("other")  # one is free
    for ev in p.fast.parse(ticker_frame(dict(moved[0], best_ask_price=1.0)), ns + 30_000):
        service._on_event(ev)
    del service._jobs[("deribit", "BTC")]["other"]
    job.busy = False
    assert job.snap is not None
    stale = job.snap
    job.snap_ns -= 1_000_000_000  # it waited a second for the job
    back = [dict(t, best_bid_price=round(float(t["best_bid_price"]) * 0.8, 8)) for t in first]
    job.busy = True
    last2 = feed(back, ns + 40_000)
    job.busy = False
    work = service._take(book, job)
    assert work is not None
    snap, newest, _, fresh = work
    assert fresh and snap is not stale and service.resnapshots == 1
    want2 = {str(t["instrument_name"]): float(t["best_bid_price"]) for t in back}
    assert _bids(snap) == {k: want2[k] for k in snap.instrument}  # the newest quotes
    assert newest == last2 and last2 > last1 > last0
    # the next trigger (the changes stay counted for it) snapshots the same quotes: an old
    # snapshot of a book that did not change since is fitted as it is, and with nothing new
    # since the job's last fit there is no tick to measure from
    service._kick(book)
    again = job.snap
    assert again is not None and again is not snap and _bids(again) == _bids(snap)
    job.snap_ns -= 1_000_000_000
    work = service._take(book, job)
    assert work is not None and work[0] is again and work[1] is None and not work[3]
    assert service.resnapshots == 1


async def test_derived_topics_rate_limited_and_the_last_always_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenors and greeks are built at most every DERIVED_INTERVAL_S per model (latest wins),
    off the surfaces' path; the last surface's tenors and greeks always go out (here, with
    an interval longer than the run, on the way out)."""
    monkeypatch.setattr(service_module, "DERIVED_INTERVAL_S", 600.0 * UNIT)
    rec = _recording(tmp_path, 8)
    cfg = _config(("svi",))
    mem = MemoryPublisher()
    fitted: dict[str, list[int]] = {"surface": [], "tenors": [], "greeks": []}
    greeks_of: dict[int, set[str]] = {}
    original = mem.publish

    async def logged(topic: str, payload: Any, *, retain: bool = True) -> None:
        parts = topic.split("/")
        if payload and payload.get("status") != "stale":  # fitted, not re-stamped at the end
            kind = "greeks" if "greeks" in parts else parts[-1]
            fitted[kind].append(int(payload["seq"]))
            if kind == "greeks":
                greeks_of.setdefault(int(payload["seq"]), set()).add(parts[-1])
        await original(topic, payload, retain=retain)

    mem.publish = logged  # type: ignore[method-assign]
    service = _replaying(cfg, rec, mem, 400.0 / UNIT)
    assert await asyncio.wait_for(service.run(signals=False), 120 * UNIT) == 0
    surfaces, tenors = fitted["surface"], fitted["tenors"]
    assert len(surfaces) >= 3  # enough surfaces to see the limit
    assert 1 <= len(tenors) <= 2 < len(surfaces)  # one on the interval, one on the way out
    assert set(tenors) <= set(surfaces) and set(greeks_of) == set(tenors)
    assert tenors == sorted(tenors) and tenors[-1] == surfaces[-1] == max(surfaces)
    assert len(greeks_of[surfaces[-1]]) == 3  # the last surface's greeks: the three expiries


async def test_a_fit_process_that_fails_to_start_is_started_by_its_first_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose start fails while the service warms up (a stale kernel cache compiling
    past the start timeout, say) is logged, the service comes up anyway, and the model's
    first fit starts it: its surfaces are published like the others'."""
    from streamer.daemon import fitproc

    real_start = fitproc.FitProcess.start
    failed: list[str | None] = []

    def start(self: fitproc.FitProcess) -> None:
        if self.model == "ssvi" and not failed:
            failed.append(self.model)
            raise fitproc.WorkerLostError("fit worker for ssvi did not start")
        real_start(self)

    monkeypatch.setattr(fitproc.FitProcess, "start", start)
    rec = _recording(tmp_path, 6)
    mem = MemoryPublisher()
    service = _replaying(_config(("svi", "ssvi")), rec, mem, 600.0)
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(service.run(signals=False), 60 * UNIT) == 0
    assert failed == ["ssvi"]
    assert [e["model"] for e in logs if e["event"] == "fit_worker_start_failed"] == ["ssvi"]
    models = {m.topic.split("/")[-2] for m in mem.messages if m.topic.endswith("/surface")}
    assert models == {"svi", "ssvi"}
    assert not [e for e in logs if e["event"] == "fit_worker_lost"]  # not a lost worker


class _Backlog:
    """A feed with ``n`` events already received: it never suspends (as websockets hands
    over a backlog); ``fed`` is set once all are out."""

    def __init__(self, n: int, fed: asyncio.Event | None = None) -> None:
        self.n, self.fed = n, fed

    async def events(self) -> Any:
        for i in range(self.n):
            yield Heartbeat("deribit", i, False)
        if self.fed is not None:
            self.fed.set()

    async def aclose(self) -> None:
        return None


class _Counting:
    """Counts the events ``service`` applies (``n``), calling ``after(n)`` after each."""

    def __init__(self, service: Service, after: Callable[[int], None] | None = None) -> None:
        self.n = 0
        apply = service._on_event

        def counting(ev: Any) -> None:
            self.n += 1
            apply(ev)
            if after is not None:
                after(self.n)

        service._on_event = counting  # type: ignore[method-assign]


async def test_a_feed_backlog_lets_the_event_loop_in_every_few_events() -> None:
    """websockets hands over every frame already received without suspending; the service
    does not hold the event loop for a whole backlog (a fit's reply, a surface's publish
    would wait for all of it): something waiting on the loop gets in every
    ``CONSUME_YIELD_EVERY`` events."""
    every = service_module.CONSUME_YIELD_EVERY
    n = 10 * every
    service = Service(
        load_config(None),
        feed_factory=lambda *a: _Backlog(n),  # type: ignore[arg-type]
        publishers=[MemoryPublisher()],
    )
    counted = _Counting(service)
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    def tick() -> None:  # what waits on the loop: it runs at every turn
        seen.append(counted.n)
        if counted.n < n:
            loop.call_soon(tick)

    loop.call_soon(tick)
    await service._consume(asyncio.Event())
    assert counted.n == n
    gaps = np.diff([0, *seen, n])
    assert gaps.max() <= every, gaps.max()
    assert len(seen) >= n // every


class _SlowBroker(MemoryPublisher):
    """A publisher whose messages reach the broker when the test says so (``wait_sent``)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = asyncio.Event()
        self.waits = 0

    async def wait_sent(self, timeout: float) -> None:
        self.waits += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.sent.wait()


async def test_the_feed_waits_while_the_fits_take_every_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the fits handed out take every core, no frame is parsed until one is done and
    the surfaces are with the broker (``wait_sent``), at most ``FEED_HOLD_S``: the frames
    wait in the socket, the fits and the broker have the cores."""
    monkeypatch.setattr(service_module, "FEED_HOLD_S", 2.0 * UNIT)
    n, at = 40, 5
    fed = asyncio.Event()
    broker = _SlowBroker()
    service = Service(
        load_config(None),
        feed_factory=lambda *a: _Backlog(n, fed),  # type: ignore[arg-type]
        publishers=[broker],
    )
    service.publishers = [broker]  # as ``run`` sets them
    service._cores = 2
    jobs = {m: service_module._Job(m, busy=True) for m in ("spline", "svi")}
    service._jobs[("deribit", "BTC")] = jobs

    def fill_the_cores(applied: int) -> None:
        if applied == at:  # what ``_kick`` does once its fits fill the cores
            service._hold_feed = service._fits_busy() >= service._cores

    counted = _Counting(service, fill_the_cores)
    consume = asyncio.create_task(service._consume(asyncio.Event()))
    for _ in range(200):  # many turns of the loop: the feed stays held
        await asyncio.sleep(0)
    assert counted.n == at and service.feed_holds == 1
    jobs["spline"].busy = False  # one fit done: a core is free ...
    service._fit_done.set()
    for _ in range(200):
        await asyncio.sleep(0)
    assert counted.n == at and broker.waits == 1  # ... but its surface is not with the broker
    broker.sent.set()
    await asyncio.wait_for(fed.wait(), 5.0 * UNIT)
    await consume
    assert counted.n == n

    # a fit that never ends holds the feed for FEED_HOLD_S, no longer
    monkeypatch.setattr(service_module, "FEED_HOLD_S", 0.05 * UNIT)
    service2 = Service(load_config(None), feed_factory=lambda *a: _Backlog(n, fed), publishers=[])  # type: ignore[arg-type]
    service2._cores = 1
    service2._jobs[("deribit", "BTC")] = {"svi": service_module._Job("svi", busy=True)}
    service2._hold_feed = True
    fed.clear()
    t0 = time.monotonic()
    await asyncio.wait_for(service2._consume(asyncio.Event()), 5.0 * UNIT)
    assert time.monotonic() - t0 >= 0.05 * UNIT and fed.is_set()
    assert service2.feed_holds == 1
