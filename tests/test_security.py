"""Security (issue 12): secrets never shown, refusals never silent, TLS + auth + ACL, units.

* Secrets: a known secret goes into every place a user may put one (a URL in a config file, in
  ``STREAMER__PUBLISH__URLS``, on the command line, ``STREAMER_MQTT_PASSWORD``) and through
  every CLI command and config error path; it must appear in no error, no log line, no
  stdout/stderr and no file the command wrote (outputs, recordings).
* Broker refusals: a real mosquitto with TLS (certificates made at test time by trustme), a
  password file and an ACL (``tests.mosquitto.secure_mosquitto_factory``). A wrong password, an
  untrusted certificate and a host name mismatch make ``streamer replay`` fail naming the
  broker, the subscriber client raise, and the daemon log an error on every attempt and report
  it in its metrics and in the status topic of another broker.
* The ACL holds: the bot reads, its publish does not land (checked with the retained state).
* The systemd units rate <= 2.5 in ``systemd-analyze security --offline=true``.

Subscribers that check what the broker delivered are plain aiomqtt clients, independent of the
code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import numpy as np
import pytest
import structlog

from streamer.client.subscribe import subscribe_payloads
from streamer.config import load_config
from streamer.daemon.service import Service
from streamer.errors import ConfigError, PublishError, SubscribeError
from streamer.feeds.deribit.fake import FakeDeribitServer, ScriptFrame
from streamer.publish.mqtt import MqttPublisher, mqtt_credentials
from streamer.publish.payloads import load_schema
from streamer.publish.urls import argv_password_error, from_url, redact
from streamer.settings import read_secret, redact_secrets
from tests.conftest import UNIT
from tests.mosquitto import BOT_USER, DAEMON_USER, Mosquitto, SecureBroker, free_port
from tests.synth import deribit_chain, make_chain, svi_surface, ticker_frame

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0 * UNIT
SECRET = "Kx9-canary-s3cret"  # the known secret: must never be shown anywhere
FUTURE_MS = 1_893_484_800_000  # 2030-01-01 08:00 UTC: expiries stay live
SURFACE = "streamer/deribit/BTC/svi/surface"

# ------------------------------------------------------------------------------ helpers


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any STREAMER_* / credentials, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STREAMER_") and k != "CREDENTIALS_DIRECTORY"
    }
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
    if "STREAMER_TEST_UNIT" in os.environ:
        env["STREAMER_TEST_UNIT"] = os.environ["STREAMER_TEST_UNIT"]
    return {**env, **extra}


def streamer(
    *args: str, env: dict[str, str], timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout * UNIT,
        env=env,
        cwd=REPO,
    )


def recording(path: Path, rounds: int = 3) -> Path:
    """A synthetic BTC chain re-quoted ``rounds`` times 2 s apart (the trigger fits each)."""
    _, fn = svi_surface()
    rng = np.random.default_rng(2)
    with path.open("w") as fh:
        for r in range(rounds):
            ts = FUTURE_MS + r * 2000
            snap = make_chain(fn, noise_iv=0.002, rng=rng, ts_ms=ts)
            for t in deribit_chain(snap)[1]:
                line = {"ts_ns": ts * 1_000_000, "venue": "deribit", "frame": ticker_frame(t)}
                fh.write(json.dumps(line) + "\n")
    return path


def chain_script(rounds: int = 3) -> tuple[list[dict[str, Any]], list[ScriptFrame]]:
    _, fn = svi_surface()
    rng = np.random.default_rng(3)
    script: list[ScriptFrame] = []
    instruments: list[dict[str, Any]] = []
    for r in range(rounds):
        snap = make_chain(fn, noise_iv=0.002, rng=rng, ts_ms=FUTURE_MS + r * 1000)
        instruments, tickers = deribit_chain(snap)
        script += [ScriptFrame(f"ticker.{t['instrument_name']}", t) for t in tickers]
    return instruments, script


def files_text(root: Path) -> Iterator[tuple[Path, bytes]]:
    """Every file under ``root`` (decompressed if zstd/gzip) as bytes."""
    import gzip

    import zstandard

    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".zst":
            with contextlib.suppress(zstandard.ZstdError):
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        elif path.suffix == ".gz":
            with contextlib.suppress(OSError):
                data = gzip.decompress(data)
        yield path, data


def assert_no_secret(*texts: str | bytes, where: str = "") -> None:
    for text in texts:
        blob = text.encode() if isinstance(text, str) else text
        assert SECRET.encode() not in blob, f"the secret leaked {where}: {blob[-2000:]!r}"


def tls_context(sb: SecureBroker, cafile: Path | None = None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile or sb.cafile))


@contextlib.asynccontextmanager
async def bot_client(sb: SecureBroker, user: str = BOT_USER) -> Any:
    async with aiomqtt.Client(
        sb.host,
        sb.port,
        username=user,
        password=sb.passwords[user],
        tls_context=tls_context(sb),
        timeout=TIMEOUT,
    ) as client:
        yield client


async def retained(sb: SecureBroker, topic: str, user: str = BOT_USER) -> dict[str, Any]:
    """What a fresh subscription to ``topic`` gets from the broker (retained messages)."""
    latest: dict[str, Any] = {}
    async with bot_client(sb, user) as client:
        await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0 * UNIT):
                async for msg in client.messages:
                    assert isinstance(msg.payload, bytes)
                    latest[msg.topic.value] = json.loads(msg.payload) if msg.payload else None
    return latest


# ------------------------------------------------------------- config errors are redacted

BAD_TABLES = [
    pytest.param(f'[publish]\nurls = "mqtt://bot:{SECRET}@broker:1883"\n', id="urls-not-a-list"),
    pytest.param(f'[publish]\nurls = [["mqtt://bot:{SECRET}@b:1883"]]\n', id="urls-item-a-list"),
    pytest.param(f'[log]\nlevel = "mqtt://bot:{SECRET}@b"\n', id="literal"),
    pytest.param(f'[metrics]\nport = "mqtt://bot:{SECRET}@b"\n', id="int"),
    pytest.param(f'[metrics]\nhost = "mqtt://bot:{SECRET}@b"\n', id="post-init"),
    pytest.param(f'[feed]\nbook_channels = "mqtt://bot:{SECRET}@b"\n', id="bool"),
    pytest.param(f'[feed]\nheartbeat_s = "mqtt://bot:{SECRET}@b"\n', id="float"),
    pytest.param(f'[models]\npenalty = "mqtt://bot:{SECRET}@b"\n', id="table"),
    pytest.param(f'[models]\npenalty = {{ svi = "mqtt://bot:{SECRET}@b" }}\n', id="table-item"),
    pytest.param(f'instance = ["mqtts://bot:{SECRET}@b:8883/x"]\n', id="str"),
    pytest.param(f'[publish]\nurls = ["mqtt://bot:{SECRET}@b"]\nprefix = 3\n', id="beside"),
]


def _shown(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


@pytest.mark.parametrize("toml", BAD_TABLES)
def test_config_errors_redact_url_passwords(tmp_path: Path, toml: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert_no_secret(_shown(info.value), where="in a config error")


def test_env_override_error_redacts_the_password() -> None:
    """Issue 12 bug 5, as reported: a bare URL (not a TOML list) in STREAMER__PUBLISH__URLS."""
    env = {"STREAMER__PUBLISH__URLS": f"mqtt://bot:{SECRET}@broker:1883"}
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    assert info.value.key == "publish.urls"
    assert "mqtt://bot:***@broker:1883" in str(info.value)
    assert_no_secret(_shown(info.value), where="in the env override error")


@pytest.mark.parametrize(
    "url",
    [
        f"mqtt://bot:{SECRET}@broker:18x3",  # bad port
        f"mqtt://bot:{SECRET}@/prefix",  # no host
        f"mqtt://bot:{SECRET}@h:1883?qos=1",  # query
        f"mqtt://bot:{SECRET}@h:1883/a+b",  # bad prefix
        f"ftp://bot:{SECRET}@h",  # scheme
        f"mqtt://bot:pa/{SECRET}@h:1883",  # an unencoded "/" breaks URL parsing
        f"mqtt://bot:{SECRET}#1@h:1883",  # an unencoded "#"
    ],
)
def test_url_errors_redact_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_url(url)
    assert_no_secret(_shown(info.value), where="in a URL error")
    assert "***" in str(info.value)


def test_bad_option_error_redacts() -> None:
    with pytest.raises(ConfigError) as info:
        from_url(f"mqtts://bot:{SECRET}@h:8883", nope=1)
    assert_no_secret(_shown(info.value))


def test_redact_keeps_what_is_not_a_password() -> None:
    assert redact("mqtt://u@h:1883/p") == "mqtt://u@h:1883/p"
    assert redact("jsonl:/tmp/a@b.jsonl") == "jsonl:/tmp/a@b.jsonl"
    assert redact("mqtts://u:p%40ss@h:8883/x") == "mqtts://u:***@h:8883/x"
    text = f"['mqtt://a:{SECRET}@h1', 'mqtts://b:{SECRET}@h2:8883/x']"
    assert redact_secrets(text) == "['mqtt://a:***@h1', 'mqtts://b:***@h2:8883/x']"


def test_publisher_repr_and_stats_never_show_credentials() -> None:
    pub = from_url(f"mqtts://bot:{SECRET}@h:8883/x")
    assert isinstance(pub, MqttPublisher)
    assert_no_secret(repr(pub), repr(pub.stats()), repr(vars(pub).get("_password_source")))
    assert pub.broker == "mqtts://h:8883"


# ------------------------------------------------------------------ where secrets come from


def test_read_secret_sources_and_their_order(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-credential\n")
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    both = {"STREAMER_MQTT_PASSWORD": "from-env", "STREAMER_MQTT_PASSWORD_FILE": str(pw_file)}
    cred_env = {"CREDENTIALS_DIRECTORY": str(creds)}
    # the environment (or its _FILE) comes before the systemd credential
    assert read_secret("mqtt_password", {"STREAMER_MQTT_PASSWORD": "from-env", **cred_env}) == (
        "from-env",
        "environment STREAMER_MQTT_PASSWORD",
    )
    value, source = read_secret(
        "mqtt_password", {"STREAMER_MQTT_PASSWORD_FILE": str(pw_file), **cred_env}
    ) or ("", "")
    assert value == "from-file" and "STREAMER_MQTT_PASSWORD_FILE" in source  # newline dropped
    assert read_secret("mqtt_password", cred_env) == (
        "from-credential",
        "systemd credential mqtt_password",
    )
    assert read_secret("mqtt_password", {}) is None
    assert read_secret("mqtt_password", {"CREDENTIALS_DIRECTORY": str(tmp_path / "no")}) is None
    # ambiguity and unreadable files are errors that never show the secret
    with pytest.raises(ConfigError, match="not both"):
        read_secret("mqtt_password", both)
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret("mqtt_password", {"STREAMER_MQTT_PASSWORD_FILE": str(tmp_path / "missing")})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_secret("mqtt_password", {"STREAMER_MQTT_PASSWORD_FILE": str(empty)})


def test_mqtt_credentials_url_first_then_env_then_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("cred-pw")
    (creds / "mqtt_username").write_text("cred-user")
    for var in ("STREAMER_MQTT_PASSWORD", "STREAMER_MQTT_USERNAME", "STREAMER_MQTT_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    c = mqtt_credentials()
    assert (c.username, c.password) == ("cred-user", "cred-pw")
    assert c.password_source == "systemd credential mqtt_password"
    monkeypatch.setenv("STREAMER_MQTT_PASSWORD", "env-pw")
    assert mqtt_credentials().password == "env-pw"
    c = mqtt_credentials("url-user", "url-pw")
    assert (c.username, c.password, c.password_source) == ("url-user", "url-pw", "the URL")
    pub = from_url("mqtt://h:1883")
    assert isinstance(pub, MqttPublisher)
    assert pub.stats().broker == "mqtt://h:1883"


def test_argv_password_error_says_where_to_put_it() -> None:
    assert argv_password_error("--publish", "mqtt://bot@h:1883/x") is None
    assert argv_password_error("--publish", "jsonl:-") is None
    msg = argv_password_error("--publish", f"mqtt://bot:{SECRET}@h:1883")
    assert msg is not None
    assert_no_secret(msg)
    for where in ("STREAMER_MQTT_PASSWORD", "STREAMER_MQTT_PASSWORD_FILE", "mqtt_password",
                  "LoadCredential", "config file"):  # fmt: skip
        assert where in msg


# ----------------------------------------------------------- every CLI command, one secret


def _leaky_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / f"leaky{len(list(tmp_path.glob('leaky*')))}.toml"
    path.write_text(f'[publish]\nurls = ["{url}"]\n{extra}')
    return path


def test_every_cli_command_keeps_the_secret(tmp_path: Path) -> None:
    """Each command, with the secret in the environment, in a config file and (where a
    command takes a URL) on the command line, fails or works without showing it."""
    rec = recording(tmp_path / "rec.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    env = clean_env(
        STREAMER_MQTT_USERNAME="bot",
        STREAMER_MQTT_PASSWORD=SECRET,
        STREAMER__LOG__LEVEL="debug",
    )
    bad_env = {**env, "STREAMER__PUBLISH__URLS": f"mqtt://bot:{SECRET}@broker:1883"}
    bad_cfg = _leaky_config(tmp_path, f"mqtt://bot:{SECRET}@127.0.0.1:18x3")
    typo_cfg = _leaky_config(
        tmp_path, f"mqtt://bot:{SECRET}@127.0.0.1:1", '[book]\nstale_after_s = "soon"\n'
    )
    leaky_url = f"mqtt://bot:{SECRET}@127.0.0.1:1/streamer"
    # (arguments, environment, expected exit code: 0, 2 or -1 = any failure)
    cases: list[tuple[list[str], dict[str, str], int]] = [
        (["run", "--config", str(typo_cfg)], env, 2),
        (["run"], bad_env, 2),
        (["run", "--config", str(bad_cfg)], env, 2),
        (["record", "--config", str(typo_cfg), "--dir", str(out / "rec")], env, 2),
        (["record", "--dir", str(out / "rec")], bad_env, 2),
        (["replay", str(rec), "--publish", leaky_url], env, 2),
        (["replay", str(rec), "--publish", f"mqtts://bot:{SECRET}@127.0.0.1:1"], env, 2),
        (["replay", str(rec), "--model", "svi"], bad_env, 2),
        (["replay", str(rec), "--config", str(bad_cfg)], env, 2),
        (["replay", str(rec), "--config", str(typo_cfg)], env, 2),
        (["replay", str(rec), "--model", "svi", "--out", str(out / "o.jsonl")], env, 0),
        (["subscribe", "streamer/#", "--url", leaky_url], env, 2),
        (["subscribe", "streamer/#", "--url", f"mqtt://bot:{SECRET}@127.0.0.1:18x3"], env, 2),
        (["simulate", "--bogus"], bad_env, 2),
        (["simulate", "--out", str(out / "sim"), "--config", str(typo_cfg)], bad_env, 2),
        (["report", str(rec), "--config", str(typo_cfg), "--out-dir", str(out / "r")], env, 2),
        (["report", "--bogus"], bad_env, 2),
        (["plot", str(rec), "--config", str(bad_cfg), "--out-dir", str(out / "p")], env, 0),
        (["plot", "--bogus"], bad_env, 2),
        (["bench", "--bogus"], bad_env, 2),
        (["bench", "mqtt", "--url", leaky_url, "--bogus"], bad_env, -1),
    ]
    for args, case_env, expected in cases:
        done = streamer(*args, env=case_env)
        where = f"from streamer {' '.join(args)}"
        assert_no_secret(done.stdout, done.stderr, where=where)
        if expected >= 0:
            assert done.returncode == expected, (where, done.stdout[-500:], done.stderr[-2000:])
        else:
            assert done.returncode != 0, (where, done.stdout[-500:], done.stderr[-2000:])
        if args[0] in ("replay", "subscribe") and ("--publish" in args or "--url" in args):
            # refused before anything else, saying where the password goes instead
            assert "STREAMER_MQTT_PASSWORD_FILE" in done.stderr, (where, done.stderr)
    for path, data in files_text(out):
        assert_no_secret(data, where=f"in {path}")
    assert (out / "o.jsonl").stat().st_size > 0  # the replay that worked wrote something


async def test_daemon_and_recorder_keep_the_secret(
    tmp_path: Path, secure_mosquitto: SecureBroker
) -> None:
    """``streamer run`` and ``streamer record`` against a fake Deribit, with the secret as a
    wrong broker password: every log line, the recording and stderr stay clean."""
    instruments, script = chain_script()
    env = clean_env(
        **secure_mosquitto.client_env(DAEMON_USER, password=SECRET),
        STREAMER__LOG__LEVEL="debug",
    )
    async with FakeDeribitServer(instruments=instruments, script=script, loops=None) as fake:
        cfg = tmp_path / "d.toml"
        cfg.write_text(
            f'instance = "leak"\n[feed]\nurl = "{fake.url}"\ncurrencies = ["BTC"]\n'
            f'[models]\nnames = ["svi"]\n[publish]\nurls = ["{secure_mosquitto.url}/streamer"]\n'
            f'[recorder]\ndir = "{tmp_path / "recordings"}"\n[log]\nformat = "json"\n'
        )
        for command in ("run", "record"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamer", command, "--config", str(cfg),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
            )  # fmt: skip
            assert proc.stderr is not None
            lines: list[bytes] = []
            try:
                async with asyncio.timeout(60 * UNIT):
                    while True:
                        line = await proc.stderr.readline()
                        assert line, b"".join(lines)[-3000:]
                        lines.append(line)
                        if command == "run" and b"mqtt_connect_refused" in line:
                            break
                        if command == "record" and b"service_ready" in line:
                            await asyncio.sleep(1.5 * UNIT)  # frames reach the recorder
                            break
                proc.send_signal(signal.SIGTERM)
                rest, _ = await asyncio.wait_for(proc.communicate(), 20 * UNIT)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            stderr = b"".join(lines) + (rest or b"")
            assert_no_secret(stderr, where=f"in streamer {command}'s logs")
            if command == "run":
                refused = [json.loads(x) for x in stderr.splitlines() if b"connect_refused" in x]
                assert refused and refused[0]["level"] == "error"
                assert secure_mosquitto.url in refused[0]["error"]
    recorded = list(files_text(tmp_path / "recordings"))
    assert recorded and any(b"ticker." in data for _, data in recorded)
    for path, data in recorded:
        assert_no_secret(data, where=f"in the recording {path}")


# ------------------------------------------------ TLS + username/password + ACL, for real


def _replay_config(tmp_path: Path, url: str) -> Path:
    cfg = tmp_path / "replay.toml"
    cfg.write_text(f'instance = "replay"\n[publish]\nurls = ["{url}"]\n[log]\nlevel = "warning"\n')
    return cfg


@pytest.mark.parametrize("source", ["env", "file", "credential", "config-url"])
async def test_replay_publishes_over_tls_with_auth_and_the_bot_reads(
    tmp_path: Path, secure_mosquitto: SecureBroker, source: str
) -> None:
    sb = secure_mosquitto
    password = sb.passwords[DAEMON_USER]
    env = clean_env(STREAMER_MQTT_CAFILE=str(sb.cafile))
    url = f"mqtts://{DAEMON_USER}@{sb.host}:{sb.port}/streamer"
    if source == "env":
        env["STREAMER_MQTT_PASSWORD"] = password
    elif source == "file":
        (tmp_path / "pw").write_text(password + "\n")
        env["STREAMER_MQTT_PASSWORD_FILE"] = str(tmp_path / "pw")
    elif source == "credential":
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "mqtt_password").write_text(password)
        env["CREDENTIALS_DIRECTORY"] = str(tmp_path / "creds")
    else:
        url = f"mqtts://{DAEMON_USER}:{password}@{sb.host}:{sb.port}/streamer"
    rec = recording(tmp_path / "rec.jsonl")
    done = await asyncio.to_thread(
        streamer, "replay", str(rec), "--model", "svi", "--config",
        str(_replay_config(tmp_path, url)), env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    published = re.search(r"published ([\d,]+) messages", done.stderr)
    assert published is not None and int(published[1].replace(",", "")) > 0, done.stderr
    got = await retained(sb, "streamer/#")  # the bot, read-only, over TLS
    surface = got[SURFACE]
    jsonschema.validate(surface, load_schema("surface"))
    assert surface["seq"] == 3 and surface["status"] == "ok"
    assert sum(1 for t in got if "/svi/greeks/" in t) == len(surface["expiries"])


async def test_bot_may_read_but_its_publish_does_not_land(secure_mosquitto: SecureBroker) -> None:
    sb = secure_mosquitto
    async with (
        MqttPublisher(
            host=sb.host, port=sb.port, tls=True, cafile=str(sb.cafile), instance="acl",
            username=DAEMON_USER, password=sb.passwords[DAEMON_USER],
        ) as pub,
        bot_client(sb) as bot,
    ):  # fmt: skip
        await bot.subscribe("streamer/#", qos=1)
        await pub.publish(SURFACE, {"seq": 1, "by": "daemon"})
        await pub.flush(TIMEOUT)
        seen: list[tuple[str, Any]] = []

        async def pump() -> None:
            async for msg in bot.messages:
                assert isinstance(msg.payload, bytes)
                seen.append((msg.topic.value, json.loads(msg.payload)))

        task = asyncio.create_task(pump())
        async with asyncio.timeout(TIMEOUT):
            while (SURFACE, {"seq": 1, "by": "daemon"}) not in seen:
                await asyncio.sleep(0.01)
        # QoS 1: the broker has handled the PUBLISH (and applied its ACL) before it PUBACKs
        await bot.publish(SURFACE, json.dumps({"seq": 99, "by": "bot"}), qos=1, retain=True)
        await bot.publish("streamer/status/acl", b"forged", qos=1, retain=True)
        # the retained state a new subscriber gets is still the daemon's, and nothing forged
        # reached the live subscriber either
        got = await retained(sb, "streamer/#")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task
    assert got[SURFACE] == {"seq": 1, "by": "daemon"}
    assert got["streamer/status/acl"]["state"] in ("online", "offline")
    assert all(payload.get("by") != "bot" for _, payload in seen if isinstance(payload, dict))
    # and the daemon user may not write outside its prefix
    async with bot_client(sb, DAEMON_USER) as daemon:
        await daemon.publish("elsewhere/x", b"{}", qos=1, retain=True)
    admin_view = await retained(sb, "elsewhere/#", user=DAEMON_USER)
    assert admin_view == {}


async def test_replay_with_a_wrong_password_fails_naming_the_broker(
    tmp_path: Path, secure_mosquitto: SecureBroker
) -> None:
    """Issue 12 bug 7: it used to exit 0, publish nothing and say nothing."""
    sb = secure_mosquitto
    env = clean_env(**sb.client_env(DAEMON_USER, password=SECRET))
    rec = recording(tmp_path / "rec.jsonl")
    done = await asyncio.to_thread(
        streamer, "replay", str(rec), "--model", "svi", "--publish", f"{sb.url}/streamer", env=env
    )
    assert done.returncode == 1, done.stderr
    assert f"MQTT broker {sb.url} refused the connection: not authorised" in done.stderr
    assert "user 'streamer'" in done.stderr and "STREAMER_MQTT_PASSWORD" in done.stderr
    assert_no_secret(done.stdout, done.stderr)
    assert await retained(sb, "streamer/#") == {}


@pytest.mark.parametrize("case", ["untrusted", "hostname"])
async def test_replay_refuses_a_certificate_it_cannot_trust(
    tmp_path: Path, secure_mosquitto_factory: Callable[..., SecureBroker], case: str
) -> None:
    if case == "untrusted":
        sb = secure_mosquitto_factory()
        env = clean_env(**{**sb.client_env(), "STREAMER_MQTT_CAFILE": str(sb.untrusted_cafile)})
        expected = "certificate is not trusted"
    else:  # signed by the trusted CA, but for another host
        sb = secure_mosquitto_factory(cert_hosts=("broker.invalid",))
        env = clean_env(**sb.client_env())
        expected = "certificate is not valid for this host name"
    rec = recording(tmp_path / "rec.jsonl", rounds=1)
    done = await asyncio.to_thread(
        streamer, "replay", str(rec), "--model", "none", "--publish", sb.url, env=env
    )
    assert done.returncode == 1, done.stderr
    assert f"MQTT broker {sb.url} TLS: the broker's {expected}" in done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr


async def test_replay_fails_when_the_broker_never_comes(tmp_path: Path) -> None:
    """Not refused, just absent: the messages are not delivered, and replay says so."""
    port = free_port()
    rec = recording(tmp_path / "rec.jsonl")
    done = await asyncio.to_thread(
        streamer, "replay", str(rec), "--model", "svi", "--publish",
        f"mqtt://127.0.0.1:{port}/streamer", env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"not delivered to mqtt://127.0.0.1:{port}" in done.stderr


async def test_publisher_check_broker(secure_mosquitto: SecureBroker) -> None:
    sb = secure_mosquitto
    kwargs: dict[str, Any] = {
        "host": sb.host, "port": sb.port, "tls": True, "cafile": str(sb.cafile),
        "username": DAEMON_USER, "close_timeout": 0.2,
    }  # fmt: skip
    async with MqttPublisher(password=sb.passwords[DAEMON_USER], **kwargs) as pub:
        assert await pub.check_broker(TIMEOUT)
        assert pub.stats().reason is None
    async with MqttPublisher(password="wrong", backoff_max=0.2, **kwargs) as pub:
        with pytest.raises(PublishError, match="not authorised") as info:
            await pub.check_broker(TIMEOUT)
        assert sb.url in str(info.value)
        assert pub.refused and pub.stats().failures.get("not_authorized", 0) >= 1
        assert not pub.connected


@pytest.mark.parametrize("reconnect", [True, False])
async def test_subscriber_raises_on_a_wrong_password(
    secure_mosquitto: SecureBroker, monkeypatch: pytest.MonkeyPatch, reconnect: bool
) -> None:
    """Used to retry forever, silently, with reconnect=True (the default)."""
    sb = secure_mosquitto
    for k, v in sb.client_env(BOT_USER, password=SECRET).items():
        monkeypatch.setenv(k, v)
    with structlog.testing.capture_logs() as logs, pytest.raises(SubscribeError) as info:
        async with asyncio.timeout(TIMEOUT):
            async with contextlib.aclosing(
                subscribe_payloads(sb.url, "streamer/#", reconnect=reconnect)
            ) as stream:
                await anext(stream)
    assert f"MQTT broker {sb.url} refused the connection: not authorised" in str(info.value)
    assert "user 'bot'" in str(info.value)
    assert_no_secret(_shown(info.value), repr(logs))
    assert any(e["log_level"] == "error" for e in logs)


# paho-mqtt 2.2 does not close the socket when the TLS handshake fails (it is freed, not
# leaked, when the exception is dropped); only that ResourceWarning is tolerated here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_subscriber_raises_on_an_untrusted_certificate(
    secure_mosquitto: SecureBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = secure_mosquitto
    for k, v in sb.client_env(BOT_USER).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("STREAMER_MQTT_CAFILE", str(sb.untrusted_cafile))
    with pytest.raises(SubscribeError, match="certificate is not trusted"):
        async with asyncio.timeout(TIMEOUT):
            async with contextlib.aclosing(subscribe_payloads(sb.url, "streamer/#")) as stream:
                await anext(stream)
    gc.collect()


async def test_streamer_subscribe_cli_refused_and_ok(secure_mosquitto: SecureBroker) -> None:
    sb = secure_mosquitto
    async with MqttPublisher(
        host=sb.host, port=sb.port, tls=True, cafile=str(sb.cafile),
        username=DAEMON_USER, password=sb.passwords[DAEMON_USER], instance="cli",
    ) as pub:  # fmt: skip
        await pub.publish(SURFACE, {"seq": 5})
        await pub.flush(TIMEOUT)
    ok = await asyncio.to_thread(
        streamer, "subscribe", SURFACE, "--url", f"mqtts://bot@{sb.host}:{sb.port}",
        "--json", "--count", "1", "--timeout", str(TIMEOUT),
        env=clean_env(**sb.client_env(BOT_USER)),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"topic": SURFACE, "payload": {"seq": 5}}
    bad = await asyncio.to_thread(
        streamer, "subscribe", SURFACE, "--url", sb.url, "--timeout", str(TIMEOUT),
        env=clean_env(**sb.client_env(BOT_USER, password=SECRET)),
    )  # fmt: skip
    assert bad.returncode == 1 and "not authorised" in bad.stderr and "timeout" not in bad.stderr
    assert_no_secret(bad.stdout, bad.stderr)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as r:
        body: bytes = r.read()
    return body.decode()


async def test_daemon_reports_a_refusal_in_logs_metrics_and_the_other_brokers_status(
    secure_mosquitto: SecureBroker, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong password at one broker: an error log line per attempt with a growing backoff,
    ``streamer_broker_connected 0`` and ``streamer_broker_error{reason}`` 1, and the reason
    in the status topic the daemon publishes on the broker that does let it in."""
    sb = secure_mosquitto
    for k, v in sb.client_env(DAEMON_USER, password=SECRET).items():
        monkeypatch.setenv(k, v)
    cfg = load_config(None, env={})
    instruments, script = chain_script()
    async with FakeDeribitServer(instruments=instruments, script=script, loops=None) as fake:
        import dataclasses

        port = free_port()
        config = dataclasses.replace(
            cfg,
            instance="refused",
            feed=dataclasses.replace(cfg.feed, url=fake.url, currencies=("BTC",)),
            models=dataclasses.replace(cfg.models, names=("svi",)),
            publish=dataclasses.replace(
                cfg.publish, urls=(f"{sb.url}/streamer", f"{mosquitto.url}/streamer")
            ),
            metrics=dataclasses.replace(cfg.metrics, port=port),
        )
        service = Service(config)
        stop = asyncio.Event()
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(service.run(stop, signals=False))
            try:

                def refusals() -> list[Any]:
                    return [e for e in logs if e["event"] == "mqtt_connect_refused"]

                async with asyncio.timeout(TIMEOUT):
                    while len(refusals()) < 3 or not service.ready.is_set():
                        await asyncio.sleep(0.02)
                    status: dict[str, Any] = {}
                    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                        await client.subscribe("streamer/status/refused", qos=1)
                        async for msg in client.messages:
                            assert isinstance(msg.payload, bytes)
                            status = json.loads(msg.payload)
                            if sb.url in status.get("brokers", {}):
                                break
                    # the gauges are refreshed by the daemon's ticker (every 0.1 s): read them
                    # once they have caught up with the three refusals logged
                    while True:
                        metrics = await asyncio.to_thread(_scrape, port)
                        if _connect_failures(metrics) >= 3:
                            break
                        await asyncio.sleep(0.05)
            finally:
                stop.set()
                await asyncio.wait_for(task, 10 * UNIT)
    found = refusals()
    assert all(e["log_level"] == "error" and e["broker"] == sb.url for e in found)
    assert all(e["reason"] == "not_authorized" for e in found)
    assert found[2]["retry_in_s"] > found[0]["retry_in_s"]  # backoff: 0.2-0.4 s vs <= 0.1 s
    assert "user 'streamer'" in found[0]["error"]
    assert_no_secret(repr(logs), json.dumps(status), metrics)
    jsonschema.validate(status, load_schema("status"))
    assert status["state"] == "online"
    assert status["brokers"][sb.url] == {
        "connected": False,
        "reason": "not_authorized",
        "error": status["brokers"][sb.url]["error"],
    }
    assert status["brokers"][mosquitto.url]["connected"] is True
    assert 'streamer_broker_connected{publisher="0"} 0' in metrics
    assert 'streamer_broker_connected{publisher="1"} 1' in metrics
    assert (
        f'streamer_broker_error{{broker="{sb.url}",publisher="0",reason="not_authorized"}} 1'
        in metrics
    )
    assert _connect_failures(metrics) >= 3


def _connect_failures(metrics: str) -> float:
    line = next(
        (
            ln
            for ln in metrics.splitlines()
            if ln.startswith("streamer_broker_connect_failures_total{")
        ),
        None,
    )
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


async def test_retained_state_after_a_reconnect_over_tls(
    secure_mosquitto_factory: Callable[..., SecureBroker],
) -> None:
    """The broker restarts (its retained store persisted): the publisher reconnects with its
    credentials, delivers what it buffered meanwhile, and a bot that subscribes afterwards
    gets the newest retained state of every topic."""
    sb = secure_mosquitto_factory(persistence=True)
    other = SURFACE.replace("/svi/", "/ssvi/")
    async with MqttPublisher(
        host=sb.host, port=sb.port, tls=True, cafile=str(sb.cafile), instance="restart",
        username=DAEMON_USER, password=sb.passwords[DAEMON_USER], backoff_max=0.2,
    ) as pub:  # fmt: skip
        await pub.publish(SURFACE, {"seq": 1})
        await pub.publish(other, {"seq": 1})
        await pub.flush(TIMEOUT)
        sb.broker.stop()
        async with asyncio.timeout(TIMEOUT):
            while pub.connected:
                await asyncio.sleep(0.01)
        await pub.publish(SURFACE, {"seq": 2})  # buffered while the broker is away
        sb.broker.start()
        await pub.wait_connected(TIMEOUT)
        await pub.flush(TIMEOUT)
        assert pub.reconnects >= 1
    got = await retained(sb, "streamer/#")
    assert got[SURFACE] == {"seq": 2} and got[other] == {"seq": 1}
    assert got["streamer/status/restart"]["state"] == "offline"


# ------------------------------------------------------------------------- systemd units

UNITS = ("streamer.service", "streamer@.service")


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_exposure_at_most_2_5(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = (REPO / "systemd" / name).read_text()
    assert "LoadCredential=mqtt_password:" in text
    # numba cannot even be imported under MemoryDenyWriteExecute=yes: the unit says why
    assert "MemoryDenyWriteExecute=no" in text and "import numba" in text
    local = tmp_path / name.replace("@.", "@x.")
    exe = shutil.which("streamer") or "/bin/true"
    local.write_text(text.replace("/opt/streamer/venv/bin/streamer", exe))
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(local)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if "Overall exposure level" in x)
    score = float(line.split(":", 1)[1].split()[0])
    assert score <= 2.5, done.stdout
    verify = subprocess.run(
        [analyze, "verify", str(local)], check=False, capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0, verify.stderr
