"""Trigger policy: each rule fires on its own, and the min interval holds them all back."""

from __future__ import annotations

from streamer.calib.trigger import TriggerPolicy
from streamer.config import TriggerConfig

CFG = TriggerConfig(
    min_changed_quotes=5, forward_move_bp=10.0, max_interval_s=2.0, min_interval_s=0.5
)


def test_nothing_changed_never_due() -> None:
    p = TriggerPolicy(CFG)
    assert not p.due(0.0)
    assert not p.due(1e9)


def test_first_fit_waits_for_the_chain_then_counts() -> None:
    p = TriggerPolicy(CFG)
    p.on_quote("27DEC24", 100.0)
    for _ in range(10):
        p.on_quote("27DEC24", 100.0)
    assert not p.due(-1.0)  # the first change starts the warm-up clock
    assert not p.due(-0.5)  # many quotes, but still warming up
    assert p.due(0.0)  # warmup_s (1 s) after the first change
    p.fitted(0.0, {"27DEC24": 100.0})
    for _ in range(4):
        p.on_quote("27DEC24", 100.0)
    assert not p.due(1.0)
    p.on_quote("27DEC24", 100.0)
    assert p.due(1.0)  # the fifth changed quote


def test_forward_move_and_min_interval() -> None:
    p = TriggerPolicy(CFG)
    p.on_quote("27DEC24", 100.0)
    p.fitted(10.0, {"27DEC24": 100.0})
    p.on_quote("27DEC24", 100.05)  # 5 bp: not enough
    assert not p.due(10.6)
    p.on_quote("27DEC24", 100.2)  # 20 bp
    assert not p.due(10.3)  # but within the min interval
    assert p.due(10.6)
    p.fitted(10.6, {"27DEC24": 100.2})
    assert p.changed == 0
    assert not p.due(100.0)


def test_max_interval_with_one_change() -> None:
    p = TriggerPolicy(CFG)
    p.on_quote("27DEC24", 100.0)
    p.fitted(0.0, {"27DEC24": 100.0})
    p.on_quote("3JAN25", 101.0)  # an expiry not in the last fit: no move reference
    assert not p.due(1.9)
    assert p.due(2.0)


def test_a_settlement_wakes_the_trigger_without_changes() -> None:
    """A quiet market still refits once the next expiry settles (``wake_at``)."""
    t = TriggerPolicy(TriggerConfig(min_interval_s=0.0, warmup_s=0.0))
    t.on_quote("A", 100.0)
    assert t.due(0.0)
    t.fitted(0.0, {"A": 100.0}, wake_at=3600.0)
    assert not t.due(3599.9) and t.due(3600.0)
    t.fitted(3600.0, {}, wake_at=float("inf"))
    assert not t.due(1e9)


def test_a_forward_move_on_unchanged_quotes_makes_a_refit_due() -> None:
    t = TriggerPolicy(TriggerConfig(min_interval_s=0.0, warmup_s=0.0, forward_move_bp=10.0))
    t.on_quote("A", 100.0)
    t.fitted(0.0, {"A": 100.0})
    assert not t.on_forward("A", 100.05) and not t.due(1.0)  # 5 bp: not yet
    assert not t.on_forward("B", 200.0)  # an expiry the fit did not have
    assert t.on_forward("A", 100.2) and t.due(1.0)  # 20 bp
