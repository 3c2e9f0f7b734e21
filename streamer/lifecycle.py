"""One shape for things with a lifetime (shared vocabulary): ``start()``, ``aclose()``, and
``async with`` doing both (publishers, the fake exchange, the fault proxy)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncResource:
    """``async with x:`` starts ``x`` and closes it, however the block ends."""

    async def start(self) -> None:
        """Start background work (a server, a connection); the default does nothing."""

    async def aclose(self) -> None:
        """Release what ``start`` took; idempotent. The default does nothing."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
