"""When to refit a surface: the trigger policy (pure, clock passed in).

A refit is due when, since the last fit,

* at least ``min_changed_quotes`` quotes changed, or
* any expiry's forward moved by more than ``forward_move_bp`` basis points (seen on a changed
  quote, ``on_quote``, or on an unchanged one, ``on_forward``), or
* ``max_interval_s`` passed with at least one changed quote (so a quiet market still gets
  fresh ``ts_ms`` and a stale surface is noticed),

and never sooner than ``min_interval_s`` after the previous fit. A fit is also due, changed
quotes or not, at ``wake_at`` (the pipeline sets it to just after the next expiry settles: the
surface and the greeks topics must drop the settled expiry even in a quiet market). The first
fit waits ``warmup_s`` after the first change, so a feed that is still delivering its first
snapshot of the chain is not fitted on a handful of quotes. Times are in seconds of the
caller's clock: venue time in replay (deterministic), monotonic time live.
"""

from __future__ import annotations

import math

from streamer.config import TriggerConfig


class TriggerPolicy:
    """Counts changes between fits and says when the next fit is due."""

    def __init__(self, config: TriggerConfig | None = None) -> None:
        self.config = config or TriggerConfig()
        self._changed = 0
        self._last_fit_t = -math.inf
        self._fit_forwards: dict[str, float] = {}
        self._max_move_bp = 0.0
        self._first_change_t: float | None = None
        self._wake_at = math.inf

    @property
    def changed(self) -> int:
        """Quotes changed since the last fit."""
        return self._changed

    def on_quote(self, expiry: str, forward: float) -> None:
        """Record one changed quote of ``expiry`` with its current forward."""
        self._changed += 1
        ref = self._fit_forwards.get(expiry)
        if ref is not None and ref > 0.0 and forward > 0.0:
            self._max_move_bp = max(self._max_move_bp, abs(forward / ref - 1.0) * 1e4)

    def on_forward(self, expiry: str, forward: float) -> bool:
        """An unchanged quote's forward (its sides and IVs did not move): True when it moved
        its expiry's forward beyond ``forward_move_bp`` since the last fit."""
        ref = self._fit_forwards.get(expiry)
        if ref is None or not (ref > 0.0 and forward > 0.0):
            return False
        move = abs(forward / ref - 1.0) * 1e4
        self._max_move_bp = max(self._max_move_bp, move)
        return move > self.config.forward_move_bp

    def due(self, now_s: float) -> bool:
        """Is a refit due at ``now_s``?"""
        c = self.config
        if self._changed == 0 and self._max_move_bp <= c.forward_move_bp:
            return now_s >= self._wake_at
        if self._last_fit_t == -math.inf:  # the first fit: let the chain arrive first
            if self._first_change_t is None:
                self._first_change_t = now_s
            return now_s - self._first_change_t >= c.warmup_s
        since = now_s - self._last_fit_t
        if since < c.min_interval_s:
            return False
        return (
            self._changed >= c.min_changed_quotes
            or self._max_move_bp > c.forward_move_bp
            or since >= c.max_interval_s
        )

    def fitted(self, now_s: float, forwards: dict[str, float], wake_at: float = math.inf) -> None:
        """A fit was started at ``now_s`` on a snapshot with these forwards per expiry; the
        next one is due at ``wake_at`` at the latest."""
        self._wake_at = wake_at
        self._changed = 0
        self._max_move_bp = 0.0
        self._last_fit_t = now_s
        self._fit_forwards = dict(forwards)
