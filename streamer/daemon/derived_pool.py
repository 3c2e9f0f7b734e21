"""A replay's derived topics (tenors, greeks) built in worker processes, delivered in order.

In a replay with models, most of the time goes to the derived topics, not the fits: on the
bundled recording a surface's tenors and greeks take ~12 ms of Python and numpy against a
~2 ms warm fit. They depend on the surface payload and the snapshot only
(``Pipeline.derived_compute`` is pure), so ``DerivedPool`` hands them to worker processes
while the replay parses and fits on, and gives the messages back in exactly the order of the
one-by-one replay: a fit's surfaces, each followed by its tenors and greeks
(``Pipeline.derived_accept`` runs here, in that order: the greeks kept for the stale
re-stamps, the clears of expiries gone). The fits stay in the replay's process, in order, so
they are the same fits.

The workers are a ``concurrent.futures.ProcessPoolExecutor`` forked from the fit workers'
fork server (``streamer.daemon.fitproc.context``: the pipeline and kernels imported once,
single-threaded BLAS), each holding a pipeline built from the replay's config; the
executor's own threads carry requests and replies, so a worker's result is taken while the
replay is busy fitting. They start only once a replay is long enough to pay for them
(``START_AFTER`` surfaces, ~5 s of inline work: a child loads its kernels in a second or
two), forked in a thread; until then, and with ``workers`` 0, everything is built inline as
before. At most ``AHEAD`` fits per worker wait for their derived topics (memory stays
bounded). A failure in a worker (an exception, or a worker that died: the pool is then given
up) is logged and the surface's derived topics are built inline instead: the same messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import signal
from collections import deque
from collections.abc import Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import structlog

from streamer.book.snapshot import ChainSnapshot
from streamer.config import Config
from streamer.daemon import logs
from streamer.daemon.pipeline import Derived, Message, Pipeline

log = structlog.get_logger(__name__)

START_AFTER = 400  # surfaces built inline (~5 s) before the workers start (~2 s each)
AHEAD = 4  # fits in flight per worker

_PIPELINE: Pipeline | None = None  # a worker's own


def _init_worker(config: Config) -> None:
    """A worker's start: its logs as the replay's (to stderr: stdout may be the replay's
    output), Ctrl-C left to the replay, its pipeline (the replay's models, greeks, tenors)
    with the kernels loaded."""
    global _PIPELINE  # noqa: PLW0603 - the one per-process state of a pool worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the replay decides when we stop
    logs.configure(config.log.level, config.log.format)
    structlog.contextvars.bind_contextvars(worker="replay-derived", pid=os.getpid())
    _PIPELINE = Pipeline.from_config(config)
    _PIPELINE.warm_up()


def _derive(snap: ChainSnapshot, payload: Mapping[str, Any]) -> Derived:
    assert _PIPELINE is not None
    return _PIPELINE.derived_compute(snap, payload, encoded=True)


@dataclass
class _Fit:
    """One fit's surface messages and the derived topics being built for each."""

    snap: ChainSnapshot
    surfaces: list[Message]
    jobs: list[concurrent.futures.Future[Derived] | None]


class DerivedPool:
    """Derived topics of a replay's fits, in worker processes (module docstring)."""

    def __init__(self, pipeline: Pipeline, config: Config, workers: int) -> None:
        self.pipeline = pipeline
        # the workers build their pipeline from the config: the replay's models and greeks
        self.config = dataclasses.replace(
            config,
            models=dataclasses.replace(config.models, names=tuple(pipeline.models)),
            publish=dataclasses.replace(config.publish, greeks=pipeline.greeks),
        )
        self.workers = max(0, workers)
        self.surfaces = 0  # surface messages seen
        self.remote = 0  # whose derived topics a worker built
        self._pool: concurrent.futures.Executor | None = None
        self._fits: deque[_Fit] = deque()
        self._started = False

    async def add(self, snap: ChainSnapshot, surfaces: list[Message]) -> list[list[Message]]:
        """One fit's surface messages (``fit_snapshot(..., derived=False)``); the message
        batches now complete, in order."""
        self.surfaces += len(surfaces)
        if not self._started and self.workers and self.surfaces > START_AFTER:
            await self._start()
        if self._pool is None and not self._fits:  # inline, as the one-by-one replay does
            return [self.pipeline.with_derived(snap, surfaces)]
        self._fits.append(_Fit(snap, surfaces, [self._submit(snap, m) for m in surfaces]))
        out = []
        while self._fits and (
            len(self._fits) > AHEAD * self.workers
            or all(job is None or job.done() for job in self._fits[0].jobs)
        ):
            out.append(await self._complete(self._fits.popleft()))
        return out

    async def drain(self) -> list[list[Message]]:
        """Every batch still waiting, in order."""
        out = []
        while self._fits:
            out.append(await self._complete(self._fits.popleft()))
        return out

    def close(self) -> None:
        """Drop what is in flight and end the workers."""
        self._fits.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------
    async def _start(self) -> None:
        """The pool, its processes forked in a thread (the fork server's start and each
        fork wait on pipes: the replay fits on meanwhile)."""
        self._started = True
        self._pool = await asyncio.to_thread(self._new_pool)
        log.info("replay_derived_workers", workers=self.workers, after_surfaces=self.surfaces)

    def _new_pool(self) -> concurrent.futures.Executor:
        from streamer.daemon.fitproc import context

        pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=context(), initializer=_init_worker, initargs=(self.config,)
        )
        for _ in range(self.workers):  # forks them now (an executor forks on submit)
            pool.submit(int)
        return pool

    def _submit(
        self, snap: ChainSnapshot, msg: Message
    ) -> concurrent.futures.Future[Derived] | None:
        pool = self._pool
        if pool is None:
            return None
        try:
            return pool.submit(_derive, snap, dict(msg.payload))
        except (BrokenProcessPool, RuntimeError) as exc:  # broken, or shut down
            self._give_up(exc)
            return None

    async def _complete(self, fit: _Fit) -> list[Message]:
        """The batch the one-by-one replay makes of ``fit``: each surface, then its derived
        topics (a worker's, else built here)."""
        p = self.pipeline
        out: list[Message] = []
        for msg, job in zip(fit.surfaces, fit.jobs, strict=True):
            out.append(msg)
            derived: Derived | None = None
            if job is not None:
                try:
                    derived = await asyncio.wrap_future(job)
                except BrokenProcessPool as exc:
                    self._give_up(exc)
                except Exception as exc:  # built here instead, where it shows
                    log.warning("replay_derived_failed", error=repr(exc)[:300])
            if derived is None:
                out.extend(p.derived_messages(fit.snap, msg.payload))
                continue
            self.remote += 1
            if derived.tenors_failed:  # logged in the worker, counted here
                p.tenors_failed[str(msg.payload["model"])] += 1
            out.extend(p.derived_accept(fit.snap, msg.payload, derived))
        return out

    def _give_up(self, exc: BaseException) -> None:
        if self._pool is not None:
            log.error("replay_derived_workers_lost", error=repr(exc)[:300])
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
