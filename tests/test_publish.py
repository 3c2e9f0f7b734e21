"""Publisher plug point without a broker: encoding, URLs, jsonl and memory publishers, payload
builders and their JSON Schemas."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.errors import ConfigError, InputError, PublishError
from streamer.publish.base import decode, encode, sanitize
from streamer.publish.jsonl import JsonlPublisher
from streamer.publish.memory import MemoryPublisher
from streamer.publish.mqtt import MqttPublisher
from streamer.publish.payloads import (
    GREEKS_COLUMNS,
    expiry_entry,
    fit_info,
    greeks_payload,
    greeks_row,
    greeks_rows,
    load_schema,
    surface_payload,
    topic_greeks,
    topic_status,
    topic_surface,
)
from streamer.publish.urls import from_url, redact

NAN = float("nan")
INF = float("inf")

# -- sanitizing and encoding -------------------------------------------------------------


def test_sanitize_turns_every_non_finite_into_none() -> None:
    value: dict[Any, Any] = {
        "a": NAN,
        "b": INF,
        "c": -INF,
        "d": 1.5,
        "e": np.float64(NAN),
        "f": np.float32(INF),
        "g": np.float32(0.5),
        "h": np.array([1.0, NAN, -INF, 2.0]),
        "i": [1, (NAN, {"deep": np.float64(-INF)})],
        "j": np.int64(7),
        "k": np.bool_(True),
        "l": np.arange(6.0).reshape(2, 3)[:, 1],  # non-contiguous view
        "m": np.array([[NAN, 1.0], [2.0, INF]]),
        "n": None,
        "o": "x",
        "p": True,
        3: 4,
    }
    expected = {
        "a": None,
        "b": None,
        "c": None,
        "d": 1.5,
        "e": None,
        "f": None,
        "g": 0.5,
        "h": [1.0, None, None, 2.0],
        "i": [1, [None, {"deep": None}]],
        "j": 7,
        "k": True,
        "l": [1.0, 4.0],
        "m": [[None, 1.0], [2.0, None]],
        "n": None,
        "o": "x",
        "p": True,
        "3": 4,
    }
    out = sanitize(value)
    assert out == expected
    assert type(out["j"]) is int and type(out["k"]) is bool and type(out["g"]) is float
    # the wire form says the same, and never carries NaN / Infinity tokens
    data = encode(value)
    assert b"NaN" not in data and b"Infinity" not in data
    assert json.loads(data) == expected


def test_sanitize_rejects_what_json_cannot_carry() -> None:
    with pytest.raises(TypeError, match="complex"):
        sanitize({"z": np.array([1j])})
    with pytest.raises(TypeError, match="object"):
        sanitize({"z": object()})
    with pytest.raises(InputError, match="payload"):
        encode({"z": object()})
    with pytest.raises(InputError, match="complex"):
        encode({"z": [np.complex128(1j)]})


def _reference(value: Any) -> Any:
    # independent, obviously-correct version for plain Python values
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _reference(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reference(v) for v in value]
    return value


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=30,
)


@given(st.dictionaries(st.text(max_size=4), _json_values, max_size=5))
def test_encode_roundtrip_matches_reference(value: dict[str, Any]) -> None:
    expected = _reference(value)
    assert sanitize(value) == expected
    assert decode(encode(value)) == expected


@given(st.lists(st.floats(width=64), max_size=30))
def test_sanitize_float_arrays(values: list[float]) -> None:
    arr = np.array(values, dtype=np.float64)
    expected = [v if math.isfinite(v) else None for v in values]
    assert sanitize(arr) == expected
    assert decode(encode({"a": arr}))["a"] == expected


# -- URLs ---------------------------------------------------------------------------------


def test_from_url_mqtt_parts() -> None:
    pub = from_url("mqtt://bot%40desk:p%3Ass@broker.local:1884/desk/vol", instance="btc")
    assert isinstance(pub, MqttPublisher)
    assert (pub.host, pub.port, pub.prefix, pub.instance) == (
        "broker.local",
        1884,
        "desk/vol",
        "btc",
    )
    assert pub._username == "bot@desk" and pub._password == "p:ss"
    assert pub.status_topic == "desk/vol/status/btc"
    assert not pub._tls


def test_from_url_defaults_and_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_MQTT_USERNAME", "envuser")
    monkeypatch.setenv("STREAMER_MQTT_PASSWORD", "envpass")
    monkeypatch.setenv("STREAMER_MQTT_CAFILE", "/nonexistent/ca.pem")
    plain = from_url("mqtt://127.0.0.1", prefix_default="px")
    assert isinstance(plain, MqttPublisher)
    assert (plain.port, plain.prefix) == (1883, "px")
    assert (plain._username, plain._password) == ("envuser", "envpass")
    secure = from_url("mqtts://h")
    assert isinstance(secure, MqttPublisher)
    assert secure.port == 8883 and secure._tls and secure._cafile == "/nonexistent/ca.pem"
    with pytest.raises(PublishError, match="CA file"):
        secure._tls_context()
    insecure = from_url("mqtts://h:1", cafile=None, insecure=True)
    assert isinstance(insecure, MqttPublisher)
    monkeypatch.delenv("STREAMER_MQTT_CAFILE")
    ctx = MqttPublisher(host="h", tls=True, insecure=True)._tls_context()
    assert ctx is not None and not ctx.check_hostname


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://h:1883", "unknown scheme 'http'"),
        ("nothing", "unknown scheme"),
        ("mqtt://h:notaport", "bad port"),
        ("mqtt://h:99999", "bad port"),
        ("mqtt://:1883", "missing host"),
        ("mqtt://h:1883/a/+/b", "bad topic prefix"),
        ("mqtt://h:1883/x?cafile=y", "query"),
        ("jsonl:", "missing path"),
        ("memory:somewhere", "takes no path"),
    ],
)
def test_from_url_errors_name_the_bad_part(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        from_url(url)
    assert info.value.key == "publish.url"


def test_bad_option_and_password_redacted() -> None:
    with pytest.raises(ConfigError, match="bad option") as info:
        from_url("mqtt://u:secret@h:1883", bogus=1)
    assert "secret" not in str(info.value)
    with pytest.raises(ConfigError) as info2:
        from_url("mqtt://u:secret@h:port")
    assert "secret" not in str(info2.value)
    assert redact("mqtt://u:secret@h:1883/p") == "mqtt://u:***@h:1883/p"
    assert redact("mqtt://h:1883") == "mqtt://h:1883"


# -- jsonl and memory publishers -------------------------------------------------------------


async def test_jsonl_file_lines_are_flushed_live(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    pub = from_url(f"jsonl:{path}")
    assert isinstance(pub, JsonlPublisher)
    async with pub:
        await pub.publish("streamer/a", {"x": NAN, "y": [1.0, INF], "z": np.float64(2.5)})
        # visible to a reader before close
        first = path.read_text().splitlines()
        assert [json.loads(line) for line in first] == [
            {"topic": "streamer/a", "payload": {"x": None, "y": [1.0, None], "z": 2.5}}
        ]
        await pub.publish("streamer/b", {"n": 1}, retain=False)
        assert len(path.read_text().splitlines()) == 2
    assert pub.published == 2
    with pytest.raises(PublishError, match="closed"):
        await pub.publish("streamer/a", {})
    await pub.aclose()  # idempotent


async def test_encoded_payloads_are_written_as_they_are(tmp_path: Path) -> None:
    """A payload encoded in another process (``publish_encoded``, ``deliver`` of bytes) gives
    the line its dict gives; the memory publisher decodes it; a clear stays a clear."""
    body = {"x": NAN, "rows": [{"k": 1.5, "iv": INF}], "s": "ok"}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    async with JsonlPublisher(a) as pa, JsonlPublisher(b) as pb:
        await pa.publish("streamer/g", body)
        await pb.deliver("streamer/g", encode(body))
        await pa.deliver("streamer/g", {}, clear=True)
        await pb.deliver("streamer/g", b"", clear=True)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes().splitlines()[0] == (
        b'{"topic":"streamer/g","payload":{"x":null,"rows":[{"k":1.5,"iv":null}],"s":"ok"}}'
    )
    mem = MemoryPublisher()
    await mem.deliver("streamer/g", encode(body))
    assert mem.retained["streamer/g"] == {"x": None, "rows": [{"k": 1.5, "iv": None}], "s": "ok"}


async def test_jsonl_batch_flush_and_append(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    async with JsonlPublisher(path, flush_every=3) as pub:
        for i in range(2):
            await pub.publish("t", {"i": i})
        assert path.read_text() == ""  # batched
        await pub.publish("t", {"i": 2})
        assert len(path.read_text().splitlines()) == 3
    async with JsonlPublisher(path, append=True) as pub:
        await pub.publish("t", {"i": 3})
    lines = [json.loads(x)["payload"]["i"] for x in path.read_text().splitlines()]
    assert lines == [0, 1, 2, 3]
    with pytest.raises(PublishError, match="cannot open"):
        JsonlPublisher(tmp_path / "missing-dir" / "x.jsonl")


async def test_jsonl_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()

    class FakeStdout:
        def __init__(self) -> None:
            self.buffer = buffer

    monkeypatch.setattr(sys, "stdout", FakeStdout())
    async with from_url("jsonl:-") as pub:
        await pub.publish("streamer/s", {"v": NAN})
    assert buffer.getvalue() == b'{"topic":"streamer/s","payload":{"v":null}}\n'


async def test_memory_publisher_keeps_messages_and_latest_retained() -> None:
    pub = from_url("memory:", prefix_default="pp")
    assert isinstance(pub, MemoryPublisher) and pub.prefix == "pp"
    async with pub:
        await pub.publish("a", {"v": 1})
        await pub.publish("b", {"v": np.array([NAN])})
        await pub.publish("a", {"v": 2})
        await pub.publish("a", {"v": 3}, retain=False)
    assert [(m.topic, m.payload, m.retain) for m in pub.messages] == [
        ("a", {"v": 1}, True),
        ("b", {"v": [None]}, True),
        ("a", {"v": 2}, True),
        ("a", {"v": 3}, False),
    ]
    assert pub.retained == {"a": {"v": 2}, "b": {"v": [None]}}
    assert pub.latest("a") == {"v": 3} and pub.latest("zz") is None
    assert pub.topics() == ["a", "b"]
    with pytest.raises(PublishError):
        await pub.publish("a", {})


# -- topics, payload builders, schemas ----------------------------------------------------------


def test_topics() -> None:
    assert topic_surface("streamer", "deribit", "BTC", "svi") == "streamer/deribit/BTC/svi/surface"
    assert (
        topic_greeks("desk/vol", "deribit", "ETH", "ssvi", "27DEC24")
        == "desk/vol/deribit/ETH/ssvi/greeks/27DEC24"
    )
    assert topic_status("streamer", "deribit-btc") == "streamer/status/deribit-btc"
    with pytest.raises(InputError, match="venue"):
        topic_surface("streamer", "der/ibit", "BTC", "svi")
    with pytest.raises(InputError, match="expiry"):
        topic_greeks("streamer", "deribit", "BTC", "svi", "#")
    with pytest.raises(InputError, match="prefix"):
        topic_status("a/+", "x")


def _surface(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "venue": "deribit",
        "underlying": "BTC",
        "model": "svi",
        "ts_ms": 1613044800000,
        "seq": 3,
        "status": "ok",
        "fit": {
            "rmse_iv": 0.0042,
            "in_band": 0.91,
            "n_quotes": 312,
            "nfev": 14,
            "elapsed_ms": 3.2,
            "warm": True,
            "regime_shift": False,
            "penalty": 0.0012,
        },
        "params": {},
        "expiries": [
            {
                "expiry": "12FEB21",
                "expiry_ms": 1613116800000,
                "T": 72 / 8760,
                "forward": 47812.5,
                "atm_iv": 0.6234,
                "params": {"a": 0.001, "b": 0.12, "rho": -0.2, "m": 0.01, "sigma": NAN},
                "rmse_iv": 0.004,
                "in_band": 0.95,
                "n_quotes": 40,
            }
        ],
    }
    args.update(overrides)
    return args


def _greeks_item(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "instrument": "BTC-12FEB21-48000-C",
        "strike": 48000,
        "type": "C",
        "iv": 0.62,
        "price_coin": 0.0181,
        "price_usd": 865.4,
        "delta": 0.49,
        "delta_premium_adj": 0.4719,
        "gamma": 0.00016,
        "vega": 11.3,
        "theta": -420.0,
        "vanna": 0.05,
        "volga": 3.1,
        "bid_iv": 0.6,
        "ask_iv": NAN,
    }
    item.update(overrides)
    return item


def _validator(name: Any) -> jsonschema.Draft202012Validator:
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_surface_builder_validates_against_schema() -> None:
    payload = surface_payload(**_surface())
    wire = decode(encode(payload))
    _validator("surface").validate(wire)
    assert wire["schema"] == "streamer.surface/1"
    assert wire["expiries"][0]["params"]["sigma"] is None  # NaN -> null
    assert wire["fit"]["n_quotes"] == 312
    for status in ("ok", "degraded", "stale"):
        _validator("surface").validate(decode(encode(surface_payload(**_surface(status=status)))))


def test_greeks_builder_validates_against_schema() -> None:
    payload = greeks_payload(
        ts_ms=1613044800000,
        seq=0,
        expiry="12FEB21",
        forward=47812.5,
        T=72 / 8760,
        instruments=[_greeks_item(), _greeks_item(instrument="BTC-12FEB21-40000-P", type="P")],
    )
    wire = decode(encode(payload))
    _validator("greeks").validate(wire)
    assert wire["instruments"][0]["ask_iv"] is None
    assert wire["instruments"][0]["strike"] == 48000.0


def test_greeks_rows_from_columns_equal_single_rows() -> None:
    names = ["BTC-12FEB21-40000-P", "BTC-12FEB21-48000-C", "BTC-12FEB21-60000-C"]
    strikes = np.array([40000.0, 48000.0, 60000.0])
    cols = {c: np.array([0.1 * (i + 1), NAN, 0.3]) for i, c in enumerate(GREEKS_COLUMNS)}
    rows = greeks_rows(
        instruments=names, strikes=strikes, is_call=np.array([False, True, True]), **cols
    )
    singles = [
        greeks_row(
            instrument=names[j],
            strike=float(strikes[j]),
            type="P" if j == 0 else "C",
            **{c: float(cols[c][j]) for c in GREEKS_COLUMNS},
        )
        for j in range(3)
    ]
    assert rows == singles
    assert rows[1]["iv"] is None and rows[0]["iv"] == 0.1
    payload = greeks_payload(
        ts_ms=1, seq=1, expiry="12FEB21", forward=47812.5, T=0.01, instruments=rows
    )
    _validator("greeks").validate(decode(encode(payload)))
    with pytest.raises(InputError, match="columns"):
        greeks_rows(instruments=names, strikes=strikes, is_call=[1, 1, 1], iv=cols["iv"])
    with pytest.raises(InputError, match="iv"):
        greeks_rows(
            instruments=names, strikes=strikes, is_call=[1, 1, 1], **{**cols, "iv": np.zeros(2)}
        )


def test_builders_name_the_bad_argument() -> None:
    with pytest.raises(InputError, match="status"):
        surface_payload(**_surface(status="good"))
    with pytest.raises(InputError, match="seq"):
        surface_payload(**_surface(seq=-1))
    with pytest.raises(InputError, match="in_band"):
        fit_info(**{**_surface()["fit"], "in_band": 1.5})
    with pytest.raises(InputError, match="fit"):
        surface_payload(**_surface(fit={"rmse_iv": 0.1}))
    with pytest.raises(InputError, match="type"):
        greeks_row(**_greeks_item(type="X"))
    with pytest.raises(InputError, match="strike"):
        greeks_row(**_greeks_item(strike=0))
    with pytest.raises(InputError, match="expiry"):
        expiry_entry(**{**_surface()["expiries"][0], "expiry": ""})


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("status",), "good"),
        (("schema",), "streamer.surface/2"),
        (("seq",), -1),
        (("ts_ms",), 1.5),
        (("fit", "warm"), "yes"),
        (("fit", "in_band"), 1.2),
        (("fit", "rmse_iv"), "NaN"),
        (("expiries", 0, "atm_iv"), 62.34),  # percent, not a fraction
        (("expiries", 0, "expiry"), "2021-02-12"),
        (("expiries", 0, "forward"), 0),
        (("expiries", 0, "params", "a"), "x"),
        (("params", "extra"), [1]),
        (("fit", "unknown_key"), 1),
    ],
)
def test_surface_schema_rejects_bad_payloads(path: tuple[Any, ...], value: Any) -> None:
    wire = decode(encode(surface_payload(**_surface())))
    target = wire
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        _validator("surface").validate(wire)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("type", "CALL"),
        ("iv", 62.0),
        ("bid_iv", -0.1),
        ("strike", -1),
        ("delta", 1.5),
        ("gamma", "0.1"),
        ("vega", None),  # allowed: sanity check below flips expectation
    ],
)
def test_greeks_schema_rejects_bad_instruments(key: str, value: Any) -> None:
    wire = decode(
        encode(
            greeks_payload(
                ts_ms=1, seq=0, expiry="12FEB21", forward=1.0, T=0.1, instruments=[_greeks_item()]
            )
        )
    )
    wire["instruments"][0][key] = value
    validator = _validator("greeks")
    if value is None:
        validator.validate(wire)  # null is allowed wherever a number may be missing
        del wire["instruments"][0][key]  # but the key itself is required
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(wire)
