"""Shared fixtures: where the real Deribit data lives (skip cleanly without it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.mosquitto import (  # noqa: F401  (real-broker fixtures)
    mosquitto,
    mosquitto_factory,
    secure_mosquitto,
    secure_mosquitto_factory,
)

UNIT = float(os.environ.get("STREAMER_TEST_UNIT", "1.0"))
"""The suite's time unit: every timeout and deadline in the tests is a multiple of it (set
``STREAMER_TEST_UNIT=3`` on a slow or loaded machine). Tests make no timed assertions beyond
such generous bounds; speed is measured in benchmarks."""

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "deribit"


def shared_file(relative: str) -> Path:
    """A file under ../shared/data/deribit, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real Deribit data not available: {path} (it lives outside the repo)")
    return path


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Commands under test configure logging for their process; undo it after each test."""
    yield
    structlog.reset_defaults()
