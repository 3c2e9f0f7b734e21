"""streamer: keeps crypto option volatility surfaces calibrated in real time.

Feeds -> parse -> book -> calibrate -> publish (MQTT / JSONL). See README.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
