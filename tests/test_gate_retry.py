"""The gate's constrained re-fit is not repeated on every warm refit after it failed
(``CalibConfig.repair_retry_s``): a daily whose linear wing kept failing its butterfly check
cost every BTC spline refit a failing scipy repair of ~60-100 ms (``streamer bench latency``,
one run in three), for the same outcome: the slice left out."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from streamer.calib import gate
from streamer.calib.calibrator import CalibConfig, Calibrator
from streamer.models import REGISTRY
from streamer.models.base import Violation
from tests.synth import make_chain, svi_surface


def test_a_failed_repair_waits_for_its_retry_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    model = REGISTRY["svi"]()
    cfg = dataclasses.replace(CalibConfig.for_model(model), repair_retry_s=5.0)
    base = make_chain(svi_surface()[1], noise_iv=0.002, rng=np.random.default_rng(2))
    shortest = base.expiries[0]
    real_slices = model.arbitrage_slices

    def failing_first(X: Any, slice_T: Any) -> list[list[Violation]]:
        """The shortest slice fails its own check, whatever its parameters."""
        own = real_slices(X, slice_T)
        own[0] = [*own[0], Violation("butterfly", 0, 1.0, "test: always fails")]
        return own

    calls: list[str] = []
    outcome: list[Any] = [None]  # what the stand-in repair returns: None (fails) or x

    def repair(m: Any, x: Any, *args: Any, **kw: Any) -> Any:
        calls.append("repair")
        return outcome[0] if outcome[0] is None else np.array(x)

    monkeypatch.setattr(model, "arbitrage_slices", failing_first)
    monkeypatch.setattr(gate, "repair_slice", repair)
    cal = Calibrator(model, cfg)

    def fit_at(dt_s: float) -> tuple[str, ...]:
        snap = dataclasses.replace(base, ts_ms=base.ts_ms + int(dt_s * 1000))
        return cal.fit(snap).expiries

    assert shortest not in fit_at(0.0) and calls == ["repair"]  # tried, failed: left out
    # within the retry interval: left out again, no second repair
    assert shortest not in fit_at(1.0) and shortest not in fit_at(4.5)
    assert calls == ["repair"]
    assert cal.history.repair_failed == {shortest: base.ts_ms}
    # past it: tried again (and this time it works: the slice is back, the memory cleared)
    outcome[0] = "works"
    assert shortest in fit_at(5.5) and calls == ["repair", "repair"]
    assert cal.history.repair_failed == {}
    # a later failure is remembered anew
    outcome[0] = None
    fit_at(6.0)
    assert calls == ["repair"] * 3 and cal.history.repair_failed == {shortest: base.ts_ms + 6000}
