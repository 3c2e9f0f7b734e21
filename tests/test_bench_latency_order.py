"""``streamer bench latency`` replays a round's tickers the way Deribit's channels send them:
each instrument on its own 100 ms timer, so both underlyings interleave through a round."""

from __future__ import annotations

import json

from streamer.tools.bench.latency import _phase, requote_tick, requote_walk


def _ticker(name: str) -> dict[str, str]:
    frame = {"method": "subscription", "params": {"channel": f"ticker.{name}.100ms", "data": {}}}
    return {"frame": json.dumps(frame)}


def test_a_round_interleaves_the_underlyings_and_keeps_other_frames_first() -> None:
    listing = {"frame": json.dumps({"id": 1, "result": [{"instrument_name": "BTC-1JAN27-1-C"}]})}
    btc = [_ticker(f"BTC-30JAN26-{90_000 + 1_000 * i}-C") for i in range(60)]
    eth = [_ticker(f"ETH-30JAN26-{3_000 + 50 * i}-P") for i in range(60)]
    ordered = sorted([*btc, listing, *eth], key=_phase)  # the file: BTC, then ETH
    assert ordered[0] is listing
    tickers = ordered[1:]
    for part in (tickers[:40], tickers[40:80], tickers[80:]):  # each third of the round
        n_btc = sum('"ticker.BTC' in r["frame"] for r in part)
        assert 8 <= n_btc <= 32, n_btc  # both underlyings in every stretch of the round


def test_the_walk_requote_moves_quotes_by_their_delta_on_deribits_ticks() -> None:
    """The default re-quote: the underlying up 5 bp, implied vols held. A call near the money
    (delta 0.55) rises by (0.55 - 0.05) * 5 bp of coin, rounded to the 0.0005 tick above
    0.005; a put falls; a wing at the price floor (delta ~0) stays; the forward moves."""
    call = {"best_bid_price": 0.0495, "best_ask_price": 0.0505, "underlying_price": 90000.0,
            "index_price": 89950.0, "greeks": {"delta": 0.55}}  # fmt: skip
    requote_walk(call, 0.005)  # 50 bp: (0.55 - 0.05) * 0.005 = 0.0025 up
    assert call["best_bid_price"] == 0.052 and call["best_ask_price"] == 0.053
    assert call["underlying_price"] == 90450.0 and call["index_price"] == 90399.75
    put = {"best_bid_price": 0.0495, "best_ask_price": 0.0505, "greeks": {"delta": -0.45}}
    requote_walk(put, 0.005)  # (-0.45 - 0.05) * 0.005 = -0.0025
    assert put["best_bid_price"] == 0.047 and put["best_ask_price"] == 0.048
    wing = {"best_bid_price": 0.0001, "best_ask_price": 0.0002, "greeks": {"delta": 0.004}}
    requote_walk(wing, 0.0005)
    assert (wing["best_bid_price"], wing["best_ask_price"]) == (0.0001, 0.0002)
    floor = {"best_bid_price": 0.0001, "best_ask_price": 0.0002, "greeks": {"delta": -0.9}}
    requote_walk(floor, 0.01)  # both sides would fall to the floor and cross: the quote stays
    assert (floor["best_bid_price"], floor["best_ask_price"]) == (0.0001, 0.0002)
    low = {"best_bid_price": 0.0003, "best_ask_price": 0.0009, "greeks": {"delta": -0.9}}
    requote_walk(low, 0.0005)  # (-0.9 - p) * 5 bp: the bid to the floor, the ask to 0.00045-
    assert (low["best_bid_price"], low["best_ask_price"]) == (0.0001, 0.0004)
    bare = {"best_bid_price": 0.01, "best_ask_price": 0.011}  # no delta: the quote stays
    requote_walk(bare, 0.01)
    assert bare == {"best_bid_price": 0.01, "best_ask_price": 0.011}


def test_the_tick_requote_swings_every_side_by_a_tick() -> None:
    data = {"best_bid_price": 0.0001, "best_ask_price": 0.0003}
    requote_tick(data, 1)
    assert (data["best_bid_price"], data["best_ask_price"]) == (0.0002, 0.0004)
    data = {"best_bid_price": 0.0001, "best_ask_price": 0.0003}
    requote_tick(data, 2)
    assert (data["best_bid_price"], data["best_ask_price"]) == (0.0001, 0.0002)
