"""Fit worker processes: each model of each underlying fits in a process of its own.

The numba kernels release the GIL, but about half of a warm fit is Python and numpy glue
(slices, residual bookkeeping, the gate, the payload) that holds it; in worker threads the fits
of two underlyings and two models, the event loop's frame parsing and the derived topics all
queue for one lock (a fit's wall time was 1.6-2.6x its CPU time on 2 cores: README,
tick-to-publish). A process per job runs its fit on a core of its own. The children run
single-threaded BLAS (OpenBLAS's pool, forked without its threads, made warm BTC fits 30x
slower).

``FitProcess(config, model)`` owns one child process holding a one-model ``Pipeline`` (its
calibrators keep their warm state across fits, one per underlying). ``submit(encode(snap))``
writes the pickled snapshot from the event loop (~0.1-0.3 ms for a full BTC chain; once for
all models of a book) and ``result`` waits for the reply, read on the loop when the pipe turns
readable (no thread, no GIL hand-over): the ``FitOutcome`` of ``Pipeline.fit_model`` (the
result without its per-quote arrays) with the wall-clock start and end and the child's CPU
time of the fit. The parent's pipeline then counts and numbers it (``Pipeline.accept``), so
seq numbers, fit counters and quality windows stay in one place. ``FitProcess(config,
None, nice=10)`` is the derived worker: ``derive(snap, payload)`` runs
``Pipeline.derived_compute`` (tenors, greeks of every listed instrument); the parent keeps
the greeks for the stale re-stamps and clears the topics of expiries gone
(``Pipeline.derived_accept``).

Start: the children are forked by multiprocessing's fork server (``forkserver``: a clean,
single-threaded process that imported the pipeline, models and kernels once: a child starts in
milliseconds and loads its model's compiled kernels from numba's cache, ``Pipeline.warm_up``),
never from the daemon itself (forking a process with threads copies locks held by other
threads). ``start`` waits for the child's ``ready``.

Faults: a child that dies (killed, out of memory, a crash in a kernel) is logged
(``fit_worker_lost``, with its exit code), counted (``restarts``), and replaced by a fresh one
on the next fit (cold: its calibrators start over); the fit in flight raises
``WorkerLostError`` (the service logs it, the next trigger refits). An exception inside the fit
comes back as ``WorkerFitError`` with the child's traceback; the child lives on. ``close``
asks an idle child to exit and terminates a busy one (a hung kernel; ``join`` waits, then
kills); a fit given up by a cancelled caller leaves the child to be replaced. The fit-hang test
hook (``STREAMER_TEST_HANG_FIT_S``) is passed down: the child sleeps that long before a fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import structlog

from streamer.book.snapshot import ChainSnapshot
from streamer.config import Config
from streamer.daemon import logs
from streamer.daemon.pipeline import Derived, FitOutcome, Pipeline

log = structlog.get_logger(__name__)
_EMPTY = np.zeros(0)
Gate = Callable[[], Awaitable[None]]

START_TIMEOUT_S = 180.0  # a child's kernel loads (compiles, where the cache is stale)
_PRELOAD = ["streamer.daemon.fitproc"]  # what the fork server imports once for every child


def encode(snap: ChainSnapshot) -> bytes:
    """A fit request as the workers receive it (pickled once for all models of a book)."""
    return pickle.dumps(("fit", snap), protocol=pickle.HIGHEST_PROTOCOL)


class WorkerLostError(RuntimeError):
    """The worker process died during (or before) a fit."""


class WorkerFitError(RuntimeError):
    """The fit raised inside the worker process (the message carries its traceback)."""


# a worker is one core's worth of fits: BLAS's own thread pool would only compete with the
# other workers (OpenBLAS's threads, forked without them by the fork server, made warm BTC
# fits 30x slower: 64 ms instead of 2)
_SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@functools.cache
def context() -> Any:
    """The multiprocessing context the workers start from: one fork server per process,
    started here with single-threaded BLAS (its environment is this process's at its start;
    ours is left as it was)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    saved = {k: os.environ.get(k) for k in _SINGLE_THREADED}
    os.environ.update(_SINGLE_THREADED)
    try:
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


def _child(conn: Connection, config: Config, model: str | None, hang_s: float, nice: int) -> None:
    """The worker's loop: ``("fit", snapshot)`` in, a ``FitOutcome`` out (``model``'s fit),
    or ``("derived", snapshot, surface payload)`` in, a ``Derived`` out (``model`` None: the
    derived worker); until ``None`` or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    logs.configure(config.log.level, config.log.format)
    structlog.contextvars.bind_contextvars(worker=model or "derived", pid=os.getpid())
    if nice:
        try:
            os.nice(nice)
        except OSError as exc:  # a seccomp filter without setpriority: run at our priority
            log.warning("worker_nice_refused", nice=nice, error=repr(exc))
    pipeline = Pipeline.from_config(config, models=None if model is None else [model])
    pipeline.warm_up()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        start_ns, cpu0 = time.time_ns(), time.process_time_ns()
        try:
            out: Any
            if msg[0] == "fit" and model is not None:
                if hang_s > 0.0:
                    time.sleep(hang_s)
                    start_ns, cpu0 = time.time_ns(), time.process_time_ns()
                out = pipeline.fit_model(msg[1], model)
                # what ``Pipeline.accept`` reads goes back; the per-quote arrays, slices and
                # prepared quotes stay here (the payload carries what is published)
                out.result = dataclasses.replace(
                    out.result,
                    slices=(),
                    x=(),
                    violations=(),
                    drops=Counter(),
                    fitted_iv=_EMPTY,
                    prepared=None,
                )
            elif msg[0] == "derived":
                out = pipeline.derived_compute(msg[1], msg[2], encoded=True)
            else:
                raise ValueError(f"unknown request {msg[0]!r} for worker {model}")
            reply: tuple[Any, ...] = (
                "ok",
                out,
                start_ns,
                time.time_ns(),
                time.process_time_ns() - cpu0,
            )
        except Exception as exc:  # a bug in a fit: report it, keep serving
            reply = ("error", f"{exc!r}\n{traceback.format_exc()}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


class FitProcess:
    """One model's fits in a process of its own (see the module docstring)."""

    def __init__(
        self, config: Config, model: str | None, *, hang_s: float = 0.0, nice: int = 0
    ) -> None:
        self.config = config
        self.model = model  # None: the derived worker (tenors and greeks)
        self.hang_s = hang_s
        self.nice = nice
        self.restarts = 0
        self.fits = 0
        self._proc: Any = None
        self._conn: Connection | None = None
        self._closed = False
        self._inflight: asyncio.Future[Any] | None = None
        self._desync = False  # a fit was given up: a late reply may wait in the pipe

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    @property
    def alive(self) -> bool:
        return self._proc is not None and bool(self._proc.is_alive())

    def start(self) -> None:
        """Start the child and wait until its kernels are loaded (blocking: from a thread)."""
        ctx = context()
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_child,
            args=(child, self.config, self.model, self.hang_s, self.nice),
            name=f"streamer-fit-{self.model or 'derived'}",
            daemon=True,
        )
        proc.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            proc.kill()
            proc.join(1.0)
            parent.close()
            raise WorkerLostError(f"fit worker for {self.model} did not start")
        try:
            parent.recv()
        except (EOFError, OSError) as exc:
            proc.join(1.0)
            parent.close()
            raise WorkerLostError(
                f"fit worker for {self.model} exited at start (code {proc.exitcode})"
            ) from exc
        self._proc, self._conn, self._desync = proc, parent, False
        log.info("fit_worker_started", model=self.model, pid=proc.pid)

    @property
    def ready(self) -> bool:
        """Idle with a live child: ``submit`` may be called."""
        return not self._closed and not self._desync and self._inflight is None and self.alive

    def submit(self, data: bytes) -> asyncio.Future[Any]:
        """Hand a pickled snapshot (``encode``) to the idle child at once (from the event
        loop, which reads the reply when the pipe turns readable: no thread, no GIL
        hand-over); ``result`` waits for it. Only when ``ready``."""
        conn = self._conn
        assert conn is not None and self._inflight is None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        fd = conn.fileno()

        def on_reply() -> None:
            loop.remove_reader(fd)
            if fut.done():
                return
            try:
                fut.set_result(conn.recv_bytes())  # decoded by ``result``
            except (EOFError, OSError) as exc:
                fut.set_exception(exc)

        self._inflight = fut
        loop.add_reader(fd, on_reply)
        try:
            conn.send_bytes(data)  # the idle child reads it at once
        except (EOFError, OSError) as exc:
            loop.remove_reader(fd)
            fut.set_exception(exc)
        return fut

    async def result(
        self, fut: asyncio.Future[Any], before_decode: Gate | None = None
    ) -> tuple[Any, int, int, int]:
        """The reply to ``submit``: ``(outcome, start ns, end ns, child CPU ns)``; raises
        ``WorkerLostError`` (the child died or was closed) or ``WorkerFitError``.
        ``before_decode``: awaited between the reply's arrival and its unpickling (a large
        reply, the greeks, waits for the fits in flight)."""
        done = False
        try:
            data = await fut
            done = True
        except (EOFError, OSError) as exc:
            done = True
            if self._closed:
                raise WorkerLostError(f"fit worker for {self.model} closed") from exc
            self._lost("died during the fit")
            raise WorkerLostError(f"fit worker for {self.model} died during a fit") from exc
        finally:
            self._inflight = None
            if not done:  # cancelled under the fit: its reply is not ours any more
                self._desync = True
                conn = self._conn
                if conn is not None:
                    with contextlib.suppress(Exception):
                        asyncio.get_running_loop().remove_reader(conn.fileno())
        if before_decode is not None:
            await before_decode()
        reply = pickle.loads(data)
        if reply[0] == "error":
            raise WorkerFitError(reply[1])
        self.fits += 1
        _, outcome, start_ns, end_ns, cpu_ns = reply
        return outcome, start_ns, end_ns, cpu_ns

    async def fit(self, snap: ChainSnapshot) -> tuple[FitOutcome, int, int, int]:
        """``submit`` + ``result``, (re)starting the child first when it died or a fit was
        given up (in a thread: a start takes a second)."""
        return await self._call(encode(snap))

    async def derive(
        self, snap: ChainSnapshot, payload: Mapping[str, Any], before_decode: Gate | None = None
    ) -> tuple[Derived, int, int, int]:
        """The tenors and greeks of a surface payload (``Pipeline.derived_compute``)."""
        data = pickle.dumps(("derived", snap, dict(payload)), protocol=pickle.HIGHEST_PROTOCOL)
        return await self._call(data, before_decode)

    async def _call(
        self, data: bytes, before_decode: Gate | None = None
    ) -> tuple[Any, int, int, int]:
        if self._closed:
            raise WorkerLostError(f"fit worker for {self.model} closed")
        if not self.ready:
            if self._proc is not None:  # else never started (or its start failed): start
                self._lost("given up" if self._desync and self.alive else "dead before the fit")
            await asyncio.to_thread(self.start)
        return await self.result(self.submit(data), before_decode)

    def _lost(self, when: str) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None:
            if proc.is_alive():  # given up: not ours any more
                proc.kill()
            proc.join(1.0)
        if when != "given up":
            self.restarts += 1
            code = None if proc is None else proc.exitcode
            log.error("fit_worker_lost", model=self.model, when=when, exit_code=code,
                      restarts=self.restarts)  # fmt: skip
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Ask the child to exit (terminate it if a fit is in flight or was given up); no
        waiting here (``join``). Call it on the event loop that runs the fits."""
        self._closed = True
        proc, conn, fut = self._proc, self._conn, self._inflight
        if proc is None:
            return
        if fut is not None and not fut.done():
            fut.set_exception(EOFError("closed"))
        if conn is not None and fut is None and not self._desync:
            try:
                conn.send(None)  # idle: a clean goodbye
                return
            except (EOFError, OSError):
                pass
        proc.terminate()

    def join(self, timeout: float = 1.0) -> None:
        """Wait for the child to end after ``close`` (blocking); kill it after ``timeout``."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
        if conn is not None:
            conn.close()
        self._proc = self._conn = None
