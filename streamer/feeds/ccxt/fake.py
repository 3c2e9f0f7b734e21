"""``FakeCcxtExchange``: the in-package test double of a ccxt.pro exchange (no network).

It replays recorded market, ticker and greeks dicts and raises what it is told to; it has the
``ExchangeLike`` shape ``CcxtFeed`` uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from streamer.errors import FeedError
from streamer.feeds.ccxt.mapping import TICK_SIZE


class FakeCcxtExchange:
    """A stand-in for a ccxt.pro exchange that replays recorded dicts (no network).

    Args:
        exchange_id: the ccxt id it pretends to be (``okx``, ...).
        markets: ccxt market dicts (keyed by ``symbol`` when given as a list).
        ticker_batches: what successive ``watch_tickers`` calls return, in order: a mapping
            symbol -> ticker dict, or an exception instance to raise from that call. Once used
            up, ``watch_tickers`` waits forever (a quiet market) or raises ``exhausted`` if set.
        greeks_batches: successive ``fetch_all_greeks`` results (symbol -> greeks dict) or
            exceptions; the last one repeats. ``has["fetchAllGreeks"]`` is True when given.
        load_errors: exceptions the first ``load_markets`` calls raise, in order.
        precision_mode: what ``precisionMode`` reports.

    ``calls`` records each method call (name, argument) for the tests; ``closed`` counts
    ``close`` calls. The same batches are shared by every copy made by ``factory``.
    """

    def __init__(
        self,
        exchange_id: str,
        markets: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
        ticker_batches: Iterable[Mapping[str, Mapping[str, Any]] | BaseException] = (),
        *,
        greeks_batches: Sequence[Mapping[str, Mapping[str, Any]] | BaseException] | None = None,
        load_errors: Iterable[BaseException] = (),
        exhausted: BaseException | None = None,
        precision_mode: int = TICK_SIZE,
    ) -> None:
        self.id = exchange_id
        if isinstance(markets, Mapping):
            self.markets: dict[str, Mapping[str, Any]] = dict(markets)
        else:
            self.markets = {str(m["symbol"]): m for m in markets}
        self._batches = list(ticker_batches)
        self._greeks = list(greeks_batches) if greeks_batches is not None else None
        self._load_errors = list(load_errors)
        self._exhausted = exhausted
        self.precisionMode = precision_mode
        self.has: Mapping[str, Any] = {
            "watchTickers": True,
            "fetchAllGreeks": greeks_batches is not None,
        }
        self.calls: list[tuple[str, object]] = []
        self.closed = 0

    def factory(self) -> FakeCcxtExchange:
        """``exchange_factory`` for ``CcxtFeed``: hands out this same object every time."""
        return self

    async def load_markets(self, reload: bool = False) -> Mapping[str, Mapping[str, Any]]:
        self.calls.append(("load_markets", reload))
        await asyncio.sleep(0)
        if self._load_errors:
            raise self._load_errors.pop(0)
        return self.markets

    async def watch_tickers(
        self, symbols: list[str] | None = None, params: Mapping[str, Any] | None = None
    ) -> Mapping[str, Mapping[str, Any]]:
        self.calls.append(("watch_tickers", None if symbols is None else tuple(symbols)))
        await asyncio.sleep(0)
        if not self._batches:
            if self._exhausted is not None:
                raise self._exhausted
            await asyncio.Event().wait()  # a market where nothing happens
        item = self._batches.pop(0)
        if isinstance(item, BaseException):
            raise item
        wanted = None if symbols is None else set(symbols)
        return {s: t for s, t in item.items() if wanted is None or s in wanted}

    async def fetch_all_greeks(
        self, symbols: list[str] | None = None, params: Mapping[str, Any] | None = None
    ) -> Mapping[str, Mapping[str, Any]]:
        self.calls.append(("fetch_all_greeks", dict(params or {})))
        await asyncio.sleep(0)
        if not self._greeks:
            raise FeedError("fetch_all_greeks is not available on this fake")
        item = self._greeks.pop(0) if len(self._greeks) > 1 else self._greeks[0]
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self.calls.append(("close", None))
        self.closed += 1
