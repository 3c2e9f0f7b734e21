"""What a bot imports: ``subscribe`` (surfaces off the bus) and ``Surface`` (IVs, prices, Greeks).

Nothing here reaches into the daemon, the feeds or the calibrator. Importing the package loads
no numba kernels: ``Surface`` (which evaluates the models) is imported on first use::

    from streamer.client import subscribe

    async for surface in subscribe("mqtt://127.0.0.1:1883", "deribit", "BTC", "svi"):
        iv = surface.iv(100_000, "27DEC24")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamer.client.subscribe import subscribe, subscribe_payloads

if TYPE_CHECKING:
    from streamer.client.surface import Surface

__all__ = ["Surface", "subscribe", "subscribe_payloads"]


def __getattr__(name: str) -> Any:
    if name == "Surface":
        from streamer.client.surface import Surface

        return Surface
    raise AttributeError(f"module 'streamer.client' has no attribute {name!r}")
