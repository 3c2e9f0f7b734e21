"""``streamer bench latency`` replays a round's tickers the way Deribit's channels send them:
each instrument on its own 100 ms timer, so both underlyings interleave through a round."""

from __future__ import annotations

import json

from streamer.tools.bench.latency import _phase


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
