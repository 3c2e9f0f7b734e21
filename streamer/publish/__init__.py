"""Publishers: where calibrated surfaces and Greeks go (MQTT, JSON Lines, memory).

``from_url`` picks one from a URL; ``payloads`` builds the DESIGN section 4 topics and payloads.
"""

from streamer.publish.base import (
    DEFAULT_PREFIX,
    SCHEMES,
    Publisher,
    decode,
    encode,
    from_url,
    redact,
    sanitize,
)

__all__ = [
    "DEFAULT_PREFIX",
    "SCHEMES",
    "Publisher",
    "decode",
    "encode",
    "from_url",
    "redact",
    "sanitize",
]
