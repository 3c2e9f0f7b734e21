"""The one exception root of streamer and its typed branches.

::

    StreamerError
    ├── ConfigError          a configuration key is missing or has a bad value
    ├── InputError           an argument to a public function is malformed
    ├── FeedError            a venue feed cannot be used (protocol, auth, rate limit)
    │   └── ParseError       one frame could not be parsed (counted and dropped by feeds)
    ├── CalibrationError     a fit could not be run at all
    ├── PublishError         a publisher cannot deliver
    └── SubscribeError       the MQTT bus cannot be read (streamer.client)

Errors carry what was wrong as attributes so callers need not parse messages.
"""

from __future__ import annotations


class StreamerError(Exception):
    """Root of every error raised by streamer."""


class ConfigError(StreamerError):
    """A configuration value is invalid; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class InputError(StreamerError, ValueError):
    """An argument is malformed; ``argument`` names it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


class FeedError(StreamerError):
    """A feed cannot continue (bad protocol state, auth, rate limit)."""


class ParseError(FeedError):
    """One frame could not be parsed; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class CalibrationError(StreamerError):
    """A calibration could not be attempted (bad snapshot, unknown model)."""


class PublishError(StreamerError):
    """A publisher could not deliver a message."""


class SubscribeError(StreamerError):
    """A subscriber could not connect to or read from the MQTT bus."""
