"""streamer: keeps crypto option volatility surfaces calibrated in real time.

Feeds -> parse -> book -> calibrate -> publish (MQTT / JSONL). See README.md for the layout:
``events``/``instruments``/``config``/``errors`` are the shared vocabulary; ``feeds``, ``book``,
``calib`` (over ``models`` and ``pricing``), ``publish`` and ``daemon`` are the stages;
``client`` is what a bot imports; ``cli`` and ``tools`` sit on top.

Importing this package does nothing but set ``__version__``: the numba cache is set up by
``streamer.pricing`` (where the kernels load), not here.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
