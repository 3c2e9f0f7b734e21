"""A fitted surface as a value: built from a surface payload, answers IVs, prices and Greeks.

The daemon computes the greeks topic through this very class (from the surface payload it is
about to publish), and bots rebuild it from what they receive, so both see the same numbers.

Units of ``greeks`` (Deribit's, DESIGN section 2): ``price_coin`` = USD / F, ``price_usd``,
``delta`` = N(d1) (puts N(d1) - 1, not premium-adjusted), ``delta_premium_adj`` = delta -
price_coin, ``gamma`` per USD, ``vega`` USD per vol point, ``theta`` USD per day (Deribit's
rule, see ``streamer.pricing.greeks``), ``vanna`` change of delta per vol point, ``volga``
change of vega (USD per vol point) per vol point. ``iv`` is a fraction (0.62).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streamer.errors import InputError
from streamer.models import REGISTRY, Model, ParamView
from streamer.pricing import black_greeks, black_price, deribit_greeks

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike


@dataclass(frozen=True, eq=False)
class Surface:
    """One published calibration of one model on one underlying."""

    venue: str
    underlying: str
    model: Model
    ts_ms: int
    seq: int
    status: str
    expiries: tuple[str, ...]
    expiry_ms: npt.NDArray[np.int64]
    T: FloatArray
    forward: FloatArray
    x: tuple[FloatArray, ...]  # per-expiry models: one vector per slice; else one vector

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], **model_kwargs: Any) -> Surface:
        """Rebuild from a ``streamer.surface/1`` payload (DESIGN section 4)."""
        try:
            name = payload["model"]
            model_cls = REGISTRY[name]
        except KeyError as exc:
            raise InputError("payload.model", f"unknown model {exc.args[0]!r}") from exc
        surface_params = dict(payload.get("params") or {})
        model = model_cls(**model_kwargs) if model_kwargs else model_cls.from_params(surface_params)
        rows = list(payload["expiries"])
        n = len(rows)
        if model.per_expiry:
            x = tuple(
                model.from_view(ParamView(surface=surface_params, slices=[dict(r["params"])]), 1)
                for r in rows
            )
        else:
            view = ParamView(surface=surface_params, slices=[dict(r["params"]) for r in rows])
            x = (model.from_view(view, n),)
        return cls(
            venue=payload["venue"],
            underlying=payload["underlying"],
            model=model,
            ts_ms=int(payload["ts_ms"]),
            seq=int(payload.get("seq", 0)),
            status=str(payload.get("status", "ok")),
            expiries=tuple(r["expiry"] for r in rows),
            expiry_ms=np.array([int(r["expiry_ms"]) for r in rows], dtype=np.int64),
            T=np.array([float(r["T"]) for r in rows]),
            forward=np.array([float(r["forward"]) for r in rows]),
            x=x,
        )

    def _slice(self, expiry: str) -> int:
        try:
            return self.expiries.index(expiry)
        except ValueError:
            raise InputError("expiry", f"{expiry!r} not in {list(self.expiries)}") from None

    def iv(self, strike: ArrayLike, expiry: str) -> FloatArray:
        """Model implied vol (fraction) at ``strike`` for ``expiry`` (at the payload's T)."""
        j = self._slice(expiry)
        K = np.atleast_1d(np.asarray(strike, dtype=np.float64))
        k = np.log(K / self.forward[j])
        T = np.full(K.shape, float(self.T[j]))
        if self.model.per_expiry:
            x, idx = self.x[j], np.zeros(K.shape, dtype=np.int64)
        else:
            x, idx = self.x[0], np.full(K.shape, j, dtype=np.int64)
        return np.asarray(self.model.implied_vol(x, k, T, idx), dtype=np.float64)

    def price(
        self, strike: ArrayLike, expiry: str, is_call: ArrayLike, *, coin: bool = True
    ) -> FloatArray:
        """Model premium: in coin (USD / F) by default, else USD."""
        j = self._slice(expiry)
        K = np.atleast_1d(np.asarray(strike, dtype=np.float64))
        F = float(self.forward[j])
        usd = np.asarray(black_price(F, K, float(self.T[j]), self.iv(K, expiry), is_call))
        return usd / F if coin else usd

    def greeks(self, strike: ArrayLike, expiry: str, is_call: ArrayLike) -> dict[str, FloatArray]:
        """IV, prices and Greeks in Deribit's units (module docstring), one array each."""
        j = self._slice(expiry)
        K = np.atleast_1d(np.asarray(strike, dtype=np.float64))
        F, T = float(self.forward[j]), float(self.T[j])
        iv = self.iv(K, expiry)
        d = deribit_greeks(F, K, T, iv, is_call)
        g = black_greeks(F, K, T, iv, is_call)
        coin = np.asarray(d.price_coin, dtype=np.float64)
        return {
            "iv": iv,
            "price_coin": coin,
            "price_usd": coin * F,
            "delta": np.asarray(d.delta, dtype=np.float64),
            "delta_premium_adj": np.asarray(d.delta_premium_adj, dtype=np.float64),
            "gamma": np.asarray(d.gamma, dtype=np.float64),
            "vega": np.asarray(d.vega, dtype=np.float64),
            "theta": np.asarray(d.theta, dtype=np.float64),
            "vanna": np.asarray(g.vanna, dtype=np.float64) / 100.0,
            "volga": np.asarray(g.volga, dtype=np.float64) / 1e4,
        }

    def atm_iv(self, expiry: str) -> float:
        """Model IV at the forward."""
        value = float(self.iv(self.forward[self._slice(expiry)], expiry)[0])
        return value if math.isfinite(value) else math.nan
