"""A replay's tenors and greeks built in worker processes (``streamer.daemon.derived_pool``):
the same messages, in the same order, as the replay that builds them inline; a worker that
fails costs nothing but time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import pickle
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
import structlog

from streamer.config import load_config
from streamer.daemon import derived_pool
from streamer.daemon.derived_pool import DerivedPool
from streamer.daemon.pipeline import Message, Pipeline, fits_inline, run_inline
from streamer.daemon.replay import items_of
from streamer.publish.base import decode, encode

ROOT = Path(__file__).resolve().parents[1]
RECORDING = ROOT / "replay_data" / "calm.jsonl.zst"
FRAMES = 3000  # ~85 fits of each model
MODELS = ["spline", "svi"]


def _items() -> list[tuple[int, Any]]:
    return list(itertools.islice(items_of([str(RECORDING)]), FRAMES))


def _timeless(o: Any) -> Any:
    """A payload without the one field that is a measurement, not a result."""
    if isinstance(o, dict):
        return {k: _timeless(v) for k, v in o.items() if k != "elapsed_ms"}
    if isinstance(o, list):
        return [_timeless(v) for v in o]
    return o


def _flat(batches: list[list[Message]]) -> list[tuple[str, Any, bool]]:
    return [(m.topic, _timeless(m.payload), m.clear) for b in batches for m in b]


async def _through_pool(pool: DerivedPool, pipeline: Pipeline, items: Any) -> list[list[Message]]:
    out: list[list[Message]] = []
    try:
        for snap, surfaces in fits_inline(pipeline, items):
            out.extend(await pool.add(snap, surfaces))
        out.extend(await pool.drain())
    finally:
        pool.close()
    return out


def test_workers_build_what_the_inline_replay_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    items = _items()
    config = load_config(None)
    want = list(run_inline(Pipeline.from_config(config, models=MODELS), items))
    monkeypatch.setattr(derived_pool, "START_AFTER", 10)
    pipeline = Pipeline.from_config(config, models=MODELS)
    pool = DerivedPool(pipeline, config, 2)
    got = asyncio.run(_through_pool(pool, pipeline, items))
    surfaces = sum(1 for b in want for m in b if m.topic.endswith("/surface"))
    assert surfaces > 100
    # every surface after the first START_AFTER went to a worker
    assert pool.remote >= surfaces - 10 - len(MODELS)
    assert len(got) == len(want)
    assert _flat(got) == _flat(want)
    assert sum(1 for b in got for m in b if "/greeks/" in m.topic) > surfaces  # not vacuous
    # the workers' tenors and greeks come as JSON bytes, the very bytes the sinks would have
    # encoded from the inline replay's payloads
    pairs = [(g, w) for bg, bw in zip(got, want, strict=True) for g, w in zip(bg, bw, strict=True)]
    derived = [(g, w) for g, w in pairs if "/greeks/" in g.topic or g.topic.endswith("/tenors")]
    remote = [(g, w) for g, w in derived if g.raw is not None]
    assert len(remote) > surfaces
    assert all(g.raw == encode(w.payload) for g, w in remote)


def test_a_message_of_bytes_decodes_on_use_and_pickles_as_bytes() -> None:
    body = {"seq": 3, "iv": float("nan"), "rows": [{"k": 1.0}]}
    plain = Message("s/deribit/BTC/svi/greeks/5JAN26", body)
    raw = plain.encoded()
    assert raw.raw == encode(body) and raw.wire == raw.raw and plain.wire is body
    assert raw.payload == {"seq": 3, "iv": None, "rows": [{"k": 1.0}]}
    back = pickle.loads(pickle.dumps(raw))
    assert back.raw == raw.raw and back == raw and back.topic == raw.topic
    assert encode(pickle.loads(pickle.dumps(plain)).payload) == encode(body)
    cleared = Message("s/t", {}, clear=True)
    assert cleared.encoded() is cleared and cleared.payload == {}
    with pytest.raises(ValueError, match="not both"):
        Message("s/t", body, raw=b"{}")


def test_stale_restamps_greeks_kept_as_bytes() -> None:
    """The greeks the derived worker sent as bytes are what a lost feed re-stamps stale."""
    items = _items()[:1500]
    config = load_config(None)
    pipeline = Pipeline.from_config(config, models=["svi"])
    fits = list(fits_inline(pipeline, items))
    snap, surfaces = fits[-1]
    payload = surfaces[0].payload
    inline = pipeline.derived_compute(snap, payload)
    encoded = pipeline.derived_compute(snap, payload, encoded=True)
    assert [e for e, _ in encoded.greeks] == [e for e, _ in inline.greeks]
    bodies = [d for _, d in inline.greeks if isinstance(d, dict)]
    assert len(bodies) == len(inline.greeks) > 3
    assert [b for _, b in encoded.greeks] == [encode(d) for d in bodies]
    msgs = pipeline.derived_accept(snap, payload, encoded)
    assert msgs and all(m.raw is not None for m in msgs if "/greeks/" in m.topic)
    stale = [m for m in pipeline.stale_messages() if "/greeks/" in m.topic]
    assert len(stale) == len(encoded.greeks)
    for m, body in zip(stale, bodies, strict=True):
        assert m.payload["status"] == "stale" and m.payload["seq"] == payload["seq"] + 1
        assert m.payload["instruments"] == decode(encode(body))["instruments"]


class _Failing(concurrent.futures.Executor):
    """An executor whose every job fails with ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        fut.set_exception(self.exc)
        return fut


@pytest.mark.parametrize("exc", [ValueError("a bug"), BrokenProcessPool("a worker died")])
def test_a_failing_worker_costs_nothing_but_time(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    items = _items()[:600]
    config = load_config(None)
    want = list(run_inline(Pipeline.from_config(config, models=MODELS), items))
    monkeypatch.setattr(derived_pool, "START_AFTER", 4)
    pipeline = Pipeline.from_config(config, models=MODELS)
    pool = DerivedPool(pipeline, config, 2)

    async def failing_pool() -> None:
        pool._started, pool._pool = True, _Failing(exc)

    monkeypatch.setattr(pool, "_start", failing_pool)
    with structlog.testing.capture_logs() as logs:
        got = asyncio.run(_through_pool(pool, pipeline, items))
    assert _flat(got) == _flat(want)
    assert pool.remote == 0
    events = {e["event"] for e in logs}
    assert (
        "replay_derived_workers_lost" if isinstance(exc, BrokenProcessPool) else
        "replay_derived_failed"
    ) in events  # fmt: skip


def test_inline_when_told_or_short() -> None:
    """``workers`` 0, or a replay shorter than ``START_AFTER`` surfaces: no worker at all."""
    items = _items()[:1500]
    config = load_config(None)
    want = list(run_inline(Pipeline.from_config(config, models=MODELS), items))
    for workers in (0, 2):
        pipeline = Pipeline.from_config(config, models=MODELS)
        pool = DerivedPool(pipeline, config, workers)
        got = asyncio.run(_through_pool(pool, pipeline, items))
        assert pool.surfaces <= derived_pool.START_AFTER
        assert pool.remote == 0 and pool._pool is None
        assert _flat(got) == _flat(want)


def test_cli_refuses_a_negative_count() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "streamer", "replay", str(RECORDING), "--derived-jobs", "-1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "--derived-jobs needs N >= 0" in run.stderr
