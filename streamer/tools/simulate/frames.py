"""The simulated venue's frames as the Deribit websocket delivers them, and deliberately bad ones.

A run starts with a ``public/get_instruments`` reply, then ``ticker.{inst}.100ms``
notifications, ``deribit_price_index.{cur}_usd`` every second and ``instrument.state.option.
{CUR}`` listings and settlements (JSON-RPC 2.0 ``subscription`` notifications, Deribit's field
names). The ``bad-data`` scenario spoils a share of the ticker frames (``spoil``): crossed quotes,
zero bids, missing fields, malformed and garbage frames; ``EXPECTED_DROP`` is the drop reason
each kind should cause in ``DeribitParser`` ("" where the frame is valid and accepted).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from streamer.tools.simulate.listing import Chain
from streamer.tools.simulate.quotes import GREEKS

FloatArray = npt.NDArray[np.float64]

# bad-data kinds -> the DeribitParser drop reason they cause ("" = accepted, not dropped)
EXPECTED_DROP: dict[str, str] = {
    "crossed": "",
    "zero_bid": "",
    "missing_optional": "",
    "missing_timestamp": "missing_field",
    "missing_instrument": "missing_field",
    "string_price": "bad_type",
    "bad_instrument": "bad_instrument",
    "truncated": "bad_json",
    "garbage": "bad_json",
    "nan_literal": "bad_json",
    "not_object": "not_object",
    "unknown_channel": "unknown_channel",
}
BAD_KINDS = tuple(EXPECTED_DROP)


def notification(channel: str, data: Any) -> str:
    return orjson.dumps(
        {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": channel, "data": data}}
    ).decode()


def instruments_reply(chain: Chain, rid: int, ts_ns: int) -> str:
    """The ``public/get_instruments`` reply (request id ``rid``) listing every live option."""
    us = ts_ns // 1000
    result = [chain.instrument(i) for i in chain.live()]
    return orjson.dumps(
        {
            "jsonrpc": "2.0",
            "id": rid,
            "result": result,
            "usIn": us - 2_000,
            "usOut": us - 1_200,
            "usDiff": 800,
            "testnet": False,
        }
    ).decode()


def state_frame(currency: str, name: str, state: str, ts_ms: int) -> str:
    """An ``instrument.state`` notification (``created``, ``started``, ``settled``)."""
    channel = f"instrument.state.option.{currency}"
    return notification(channel, {"timestamp": ts_ms, "state": state, "instrument_name": name})


def index_frame(index: str, price: float, ts_ms: int) -> str:
    """A ``deribit_price_index`` notification."""
    data = {"index_name": index, "price": price, "timestamp": ts_ms}
    return notification(f"deribit_price_index.{index}", data)


def ticker_payloads(
    chain: Chain,
    options: list[int],
    times: list[int],
    q: dict[str, FloatArray],
    sizes: FloatArray,
    index: float,
) -> list[dict[str, Any]]:
    """The ``data`` of the ticker notifications of ``options`` stamped ``times`` (ms): quote
    values ``q`` (``quotes.quote``), best sizes ``sizes`` (bid row, ask row; no bid, no bid
    size) and the index price."""
    cols = {name: v.tolist() for name, v in q.items()}
    bid_sz = np.where(q["bid"] > 0, sizes[0], 0.0).tolist()
    ask_sz = sizes[1].tolist()
    out: list[dict[str, Any]] = []
    for j, i in enumerate(options):
        out.append(
            {
                "timestamp": times[j],
                "instrument_name": chain.names[i],
                "state": "open",
                "best_bid_price": cols["bid"][j],
                "best_ask_price": cols["ask"][j],
                "best_bid_amount": bid_sz[j],
                "best_ask_amount": ask_sz[j],
                "bid_iv": cols["bid_iv"][j],
                "ask_iv": cols["ask_iv"][j],
                "mark_iv": cols["mark_iv"][j],
                "mark_price": cols["mark"][j],
                "underlying_price": cols["forward"][j],
                "underlying_index": chain.expiries[chain.exp_idx[i]].underlying_index,
                "index_price": index,
                "open_interest": chain.oi[i],
                "interest_rate": 0.0,
                "greeks": {g: cols[g][j] for g in GREEKS},
            }
        )
    return out


def spoil(kind: str, channel: str, data: dict[str, Any], rng: np.random.Generator) -> str:
    """One deliberately bad ticker frame of the given kind (``EXPECTED_DROP``); ``data`` is
    changed in place."""
    if kind == "crossed":
        bid, ask = data["best_bid_price"], data["best_ask_price"]
        if bid > 0:
            data["best_bid_price"], data["best_ask_price"] = ask, bid
            data["bid_iv"], data["ask_iv"] = data["ask_iv"], data["bid_iv"]
        else:
            data["best_bid_price"] = round(ask + 0.0010, 4)
            data["best_bid_amount"] = 1.0
    elif kind == "zero_bid":
        data["best_bid_price"] = data["best_bid_amount"] = data["bid_iv"] = 0.0
    elif kind == "missing_optional":
        del data["mark_iv"], data["greeks"], data["underlying_price"]
    elif kind == "missing_timestamp":
        del data["timestamp"]
    elif kind == "missing_instrument":
        del data["instrument_name"]
    elif kind == "string_price":
        data["mark_price"] = str(data["mark_price"])
    elif kind == "bad_instrument":
        name = str(data["instrument_name"]).split("-")
        data["instrument_name"] = "-".join([name[0], "31FEB26", *name[2:]])
    elif kind == "unknown_channel":
        channel = "tickr." + channel.removeprefix("ticker.")
    return _spoil_text(kind, channel, notification(channel, data), data, rng)


def _spoil_text(
    kind: str, channel: str, text: str, data: dict[str, Any], rng: np.random.Generator
) -> str:
    """The kinds that break the frame's text rather than its fields."""
    if kind == "truncated":
        return text[: len(text) // 2]
    if kind == "garbage":
        return "\x15\x03\x03" + rng.bytes(12).hex() + "}{"
    if kind == "nan_literal":
        return text.replace('"mark_iv":', '"mark_iv":NaN,"mark_iv_was":', 1)
    if kind == "not_object":
        return orjson.dumps(["subscription", channel, data["best_ask_price"]]).decode()
    return text
