"""Reconnect delays: capped exponential backoff with jitter, reset after a good session.

Shared vocabulary: the feed adapters (Deribit websockets, ccxt), the MQTT publisher and the
subscriber client all reconnect with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from streamer.errors import InputError

DEFAULT_BACKOFF_INITIAL_S = 1.0
DEFAULT_BACKOFF_MAX_S = 60.0
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_BACKOFF_JITTER = 0.5  # a delay is drawn from [d * (1 - jitter), d]


@dataclass
class Backoff:
    """Capped exponential reconnect delays with jitter; ``reset`` after a good session.

    The n-th delay since the last reset (n = 0, 1, ...) is drawn uniformly from
    ``[d * (1 - jitter), d]`` with ``d = min(maximum, initial * factor**n)``: jitter spreads
    many clients' reconnects apart, the cap bounds the wait (Brooker 2015, "equal jitter" when
    ``jitter = 0.5``).
    """

    initial: float = DEFAULT_BACKOFF_INITIAL_S
    maximum: float = DEFAULT_BACKOFF_MAX_S
    factor: float = DEFAULT_BACKOFF_FACTOR
    jitter: float = DEFAULT_BACKOFF_JITTER
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0
    _base: float = field(default=-1.0, repr=False)

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise InputError("backoff_initial", f"must be > 0, got {self.initial}")
        if not self.maximum >= self.initial:
            raise InputError("backoff_max", f"must be >= backoff_initial, got {self.maximum}")
        if not self.factor >= 1:
            raise InputError("backoff_factor", f"must be >= 1, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise InputError("backoff_jitter", f"must be in [0, 1], got {self.jitter}")

    def base(self) -> float:
        """The un-jittered delay the next ``next_delay`` call draws from."""
        return self.initial if self._base < 0 else self._base

    def next_delay(self) -> float:
        """The next delay in seconds; grows the base for the call after."""
        base = self.base()
        self._base = min(self.maximum, base * self.factor)
        self.attempts += 1
        return base * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        """Back to ``initial`` (after a session that worked)."""
        self._base = -1.0
        self.attempts = 0
