"""Fit worker processes (``streamer.daemon.fitproc``): the same fits as in the service's own
process, a bug in a fit reported without losing the worker, a hung fit given up on close."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from streamer.book.snapshot import ChainSnapshot
from streamer.config import load_config
from streamer.daemon.fitproc import FitProcess, WorkerFitError, WorkerLostError
from streamer.daemon.pipeline import Pipeline
from tests.conftest import UNIT
from tests.synth import make_chain, svi_surface

NOW_MS = 1_893_484_800_000 + 3_600_000  # 2030-01-01 09:00 UTC


def _snapshots(n: int) -> list[ChainSnapshot]:
    _, fn = svi_surface(days=(7, 30, 91))
    rng = np.random.default_rng(11)
    return [
        make_chain(fn, days=(7, 30, 91), ts_ms=NOW_MS + 1000 * i, noise_iv=0.002, rng=rng)
        for i in range(n)
    ]


async def test_a_worker_fits_what_the_pipeline_fits_in_process() -> None:
    """A sequence of snapshots (the first cold, then warm with the penalty) fitted in a worker
    process and by a pipeline here give the same surfaces, number for number; the worker's
    CPU time and clock stamps come back with each."""
    cfg = load_config(None)
    snaps = _snapshots(4)
    here = Pipeline.from_config(cfg, models=["svi"], greeks=False)
    worker = FitProcess(cfg, "svi")
    await asyncio.to_thread(worker.start)
    try:
        for snap in snaps:
            t0 = time.time_ns()
            outcome, start_ns, end_ns, cpu_ns = await worker.fit(snap)
            expected = here.fit_model(snap, "svi")
            assert t0 <= start_ns <= end_ns <= time.time_ns() and cpu_ns > 0
            assert outcome.payload is not None and expected.payload is not None
            got, want = dict(outcome.payload), dict(expected.payload)
            for d in (got, want):  # the fit's own clock differs, nothing else
                d["fit"] = {k: v for k, v in d["fit"].items() if k != "elapsed_ms"}
            assert got == want
            assert outcome.result.warm == expected.result.warm
            assert outcome.result.nfev == expected.result.nfev
        assert worker.fits == 4 and worker.restarts == 0
    finally:
        worker.close()
        await asyncio.to_thread(worker.join)
    assert not worker.alive


async def test_a_bug_in_a_fit_comes_back_as_an_error_and_the_worker_lives_on() -> None:
    cfg = load_config(None)
    worker = FitProcess(cfg, "svi")
    await asyncio.to_thread(worker.start)
    try:
        pid = worker.pid
        with pytest.raises(WorkerFitError, match="AttributeError"):
            await worker.fit("not a snapshot")  # type: ignore[arg-type]
        outcome, *_ = await worker.fit(_snapshots(1)[0])
        assert outcome.payload is not None and outcome.payload["model"] == "svi"
        assert worker.pid == pid and worker.restarts == 0
    finally:
        worker.close()
        await asyncio.to_thread(worker.join)


async def test_a_hung_fit_is_given_up_on_close() -> None:
    """A fit that never returns (the hang hook: the worker sleeps a minute first) does not
    hold the shutdown: ``close`` terminates the worker and the fit raises ``WorkerLostError``."""
    cfg = load_config(None)
    worker = FitProcess(cfg, "svi", hang_s=60.0)
    await asyncio.to_thread(worker.start)
    fit = asyncio.ensure_future(worker.fit(_snapshots(1)[0]))
    await asyncio.sleep(0.2 * UNIT)
    assert not fit.done()
    t0 = time.monotonic()
    worker.close()
    with pytest.raises(WorkerLostError, match="closed"):
        await asyncio.wait_for(fit, 5 * UNIT)
    await asyncio.to_thread(worker.join)
    assert not worker.alive and time.monotonic() - t0 < 5 * UNIT
