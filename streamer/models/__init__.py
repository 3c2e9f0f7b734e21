"""Volatility models: one module per model, one registry (``REGISTRY``: name -> class).

Importing this package registers every model module listed in ``_MODULES``.
"""

from __future__ import annotations

import importlib

from streamer.models.base import REGISTRY, FitData, Model, ParamView, Violation, register

_MODULES: tuple[str, ...] = (
    "svi",
    "ssvi",
    "essvi",
    "sabr",
    "heston",
    "bates",
    "heston_td",
    "bates_td",
    "spline",
)

for _name in _MODULES:
    importlib.import_module(f"streamer.models.{_name}")

__all__ = ["REGISTRY", "FitData", "Model", "ParamView", "Violation", "register"]
