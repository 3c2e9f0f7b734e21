"""The feed plug point: one small base class, and the frame parser a websocket adapter uses.

A feed adapter turns a venue's stream into normalized events (``streamer.events``)::

    async with contextlib.aclosing(feed.events()) as events:
        async for event in events:
            ...
    await feed.aclose()

``events()`` is one async iterator over the whole life of the feed (reconnecting inside it:
``FeedStatus`` events tell the consumer); ``aclose()`` releases what ``events()`` did not
(an exchange client, a socket). Adapters: ``deribit.connection.DeribitFeed`` (websockets),
``ccxt.connection.CcxtFeed``, ``recordings.replay_feed.ReplayFeed`` (files as a live feed);
``streamer.feeds.venues.open_feed`` picks one from the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from streamer.events import Event


class FrameParser(Protocol):
    """What a frame-level adapter needs from a parser: a pure function of one frame.

    ``DeribitParser`` is one; the daemon hands its ``Pipeline.fast`` (the book's fused ticker
    path, same shape) so live frames take the path replay measures. ``reset()`` is called at
    the start of every session (order-book levels restart from the new snapshots).
    """

    def parse(self, frame: str | bytes, recv_ns: int) -> Sequence[Event]: ...

    def reset(self) -> None: ...


class Feed(ABC):
    """A source of normalized events. Subclasses implement ``events``."""

    @abstractmethod
    def events(self) -> AsyncIterator[Event]:
        """Every event of the feed's life, reconnecting inside; ends when the feed does."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources ``events()`` leaves open. Idempotent."""
