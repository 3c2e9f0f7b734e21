"""The configured venue's feed adapter: ``open_feed(config, parser, on_frame)``."""

from __future__ import annotations

from collections.abc import Callable

from streamer.config import Config
from streamer.feeds.base import Feed, FrameParser

OnFrame = Callable[[str, int], None]


def _deribit(config: Config, parser: FrameParser, on_frame: OnFrame | None) -> Feed:
    from streamer.feeds.deribit.connection import DeribitFeed

    f = config.feed
    return DeribitFeed(
        url=f.url,
        currencies=f.currencies,
        parser=parser,
        book_channels=f.book_channels,
        heartbeat_s=f.heartbeat_s,
        dead_after_s=f.dead_after_s,
        max_frame_bytes=f.max_frame_bytes,
        on_frame=on_frame,
    )


def _ccxt(config: Config, parser: FrameParser, on_frame: OnFrame | None) -> Feed:
    from streamer.feeds.ccxt.connection import CcxtFeed

    return CcxtFeed(config.feed.ccxt_exchange, config.feed.currencies, on_frame=on_frame)


VENUES: dict[str, Callable[[Config, FrameParser, OnFrame | None], Feed]] = {
    "deribit": _deribit,
    "ccxt": _ccxt,
}


def open_feed(config: Config, parser: FrameParser, on_frame: OnFrame | None = None) -> Feed:
    """The adapter of ``config.feed.venue``: frames go to ``on_frame(text, recv_ns)`` (the
    recorder) before ``parser``; the ccxt adapter's frames are its ccxt results as JSON
    (``streamer.feeds.ccxt.frames``), recorded the same way."""
    return VENUES[config.feed.venue](config, parser, on_frame)
