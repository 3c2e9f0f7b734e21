"""Where the project's real market data lives (shared vocabulary).

A source checkout sits next to ``../shared`` (DESIGN section 6): real Deribit data under
``shared/data/deribit``, the recording tools under ``shared/tools``. ``$STREAMER_SHARED``
points elsewhere (``$STREAMER_DERIBIT_DATA`` at the Deribit data alone). Tests and benchmarks
that need the data skip or stop with a reason when it is absent (a user's fresh clone).
"""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]  # the repository (streamer/ is its package)


def shared_root() -> Path:
    """``$STREAMER_SHARED``, else ``../shared`` beside the checkout (it may not exist)."""
    env = os.environ.get("STREAMER_SHARED")
    return Path(env) if env else _CHECKOUT.parent / "shared"


def deribit_data() -> Path:
    """``$STREAMER_DERIBIT_DATA``, else ``shared_root()/data/deribit`` (it may not exist)."""
    env = os.environ.get("STREAMER_DERIBIT_DATA")
    return Path(env) if env else shared_root() / "data" / "deribit"
