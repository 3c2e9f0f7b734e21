"""The daemon's settings: one TOML file -> one frozen ``Config``, validated.

Sections (every key optional; defaults below and in ``config/default.toml``)::

    instance = "deribit-btc"          # names the status topic and the MQTT client id

    [feed]                            # where frames come from in `streamer run`
    venue = "deribit"                 # deribit | ccxt
    url = "wss://www.deribit.com/ws/api/v2"
    currencies = ["BTC"]
    book_channels = false             # also subscribe book.{inst}.100ms
    heartbeat_s = 10.0                # public/set_heartbeat interval
    dead_after_s = 30.0               # no frame for this long: reconnect
    max_frame_bytes = 16777216        # a longer frame is dropped and counted, never decoded
    ccxt_exchange = "okx"             # venue = "ccxt": okx | bybit | binance | deribit

    [book]
    stale_after_s = 60.0              # quotes older than this leave the snapshot
    max_spread_iv = 0.5               # wider bid-ask (in vol, 0.5 = 50 points) is dropped

    [models]
    names = ["spline", "svi"]         # streamer.models.REGISTRY names (checked by the pipeline)
    penalty = { svi = 1.0 }           # per model: lambda of the parameter-change penalty
    sabr_beta = 1.0                   # SABR's fixed beta
    objective = "band"                # mid | band, every model (unset: each model's default)

    [models.calib.svi]                # per model: any streamer.calib.options.CalibConfig field
    objective = "band"                # (beats the models-wide keys above) ...
    [models.calib.svi.filters]        # ... and any streamer.calib.data.FilterConfig field
    min_T_days = 0.0833

    A field the config does not set takes the model's own default (``Model.calib_defaults``,
    what wins on ``streamer bench quality``), else ``CalibConfig``'s.

    [trigger]                         # see streamer.calib.trigger (TriggerConfig here)
    min_changed_quotes = 20
    forward_move_bp = 10.0
    max_interval_s = 5.0
    min_interval_s = 0.2

    [publish]
    urls = ["jsonl:-"]                # mqtt://[user[:pass]@]host:1883/prefix, jsonl:PATH, ...
    prefix = "streamer"
    greeks = true                     # also publish the per-expiry greeks topics
    tenors_days = [1, 7, 14, 30, 60, 90, 180, 365]  # the tenors topic's constant maturities
                                      # (whole days, increasing; [] = no tenors topic)

    [recorder]
    dir = ""                          # "" = off; else raw frames go to DIR/*.jsonl.zst
    rotate_mb = 256
    rotate_minutes = 60

    [metrics]
    host = "127.0.0.1"                # loopback only unless allow_remote
    port = 0                          # 0 = off
    allow_remote = false              # true: any host (e.g. "0.0.0.0"), logged as a warning

    [watchdog]                        # systemd's WATCHDOG=1 is sent only while work progresses
    fit_s = 60.0                      # a fit running longer than this: stuck
    feed_s = 0.0                      # connected, no frame or event this long: stuck
                                      # (0: twice the feed's own dead-after interval)

    [web]                             # the live page, served by the daemon itself
    listen = ""                       # "" = off; e.g. "127.0.0.1:8808" (streamer.tools.web)
    allow_remote = false              # true: a host that is not loopback (no login!), warned
    history = 3000                    # surfaces kept per model for the page's history charts

    [log]
    level = "info"                    # debug | info | warning | error
    format = "auto"                   # auto (JSON unless a TTY) | json | pretty

Environment variables override keys: ``STREAMER__PUBLISH__URLS='["mqtt://h:1883"]'``,
``STREAMER__LOG__LEVEL=debug`` (see ``streamer.settings``).

Secrets: a password may sit in a ``publish.urls`` URL of the config file (or of
``STREAMER__PUBLISH__URLS``); otherwise it comes from ``STREAMER_MQTT_PASSWORD``, the file
named by ``STREAMER_MQTT_PASSWORD_FILE``, or the systemd credential ``mqtt_password``
(``streamer.settings.read_secret``; the order is in its docstring), never from the command
line. Every config error that shows a value shows it with URL passwords redacted.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamer.errors import ConfigError
from streamer.settings import apply_env, build, is_loopback

DEFAULT_DERIBIT_URL = "wss://www.deribit.com/ws/api/v2"
DEFAULT_MIN_CHANGED_QUOTES = 20
DEFAULT_FORWARD_MOVE_BP = 10.0
DEFAULT_MAX_INTERVAL_S = 5.0
DEFAULT_MIN_INTERVAL_S = 0.2
DEFAULT_WARMUP_S = 1.0
DEFAULT_TENORS_DAYS = (1, 7, 14, 30, 60, 90, 180, 365)  # the tenors topic (streamer.client.tenors)
MAX_TENOR_DAYS = 3650


@dataclass(frozen=True, slots=True)
class TriggerConfig:
    """Refit after N changed quotes, a forward move beyond x bp, or a max interval."""

    min_changed_quotes: int = DEFAULT_MIN_CHANGED_QUOTES
    forward_move_bp: float = DEFAULT_FORWARD_MOVE_BP
    max_interval_s: float = DEFAULT_MAX_INTERVAL_S
    min_interval_s: float = DEFAULT_MIN_INTERVAL_S
    warmup_s: float = DEFAULT_WARMUP_S

    def __post_init__(self) -> None:
        if self.min_changed_quotes < 1:
            raise ValueError("trigger.min_changed_quotes must be >= 1")
        if not self.forward_move_bp > 0.0:
            raise ValueError("trigger.forward_move_bp must be > 0")
        if not 0.0 <= self.min_interval_s <= self.max_interval_s:
            raise ValueError("trigger: need 0 <= min_interval_s <= max_interval_s")
        if not self.warmup_s >= 0.0:
            raise ValueError("trigger.warmup_s must be >= 0")


@dataclass(frozen=True)
class FeedSettings:
    venue: Literal["deribit", "ccxt"] = "deribit"
    url: str = DEFAULT_DERIBIT_URL
    currencies: tuple[str, ...] = ("BTC",)
    book_channels: bool = False
    heartbeat_s: float = 10.0
    dead_after_s: float = 30.0
    ccxt_exchange: Literal["okx", "bybit", "binance", "deribit"] = "okx"
    max_frame_bytes: int = 16 * 1024 * 1024  # streamer.feeds.deribit.parser's default

    def __post_init__(self) -> None:
        if self.heartbeat_s < 10.0:
            raise ValueError("feed.heartbeat_s: Deribit needs at least 10 s")
        if self.dead_after_s <= self.heartbeat_s:
            raise ValueError("feed.dead_after_s must exceed feed.heartbeat_s")
        if not 1024 <= self.max_frame_bytes <= 2**31:
            raise ValueError("feed.max_frame_bytes must lie in [1024, 2**31]")


@dataclass(frozen=True)
class BookSettings:
    stale_after_s: float = 60.0
    max_spread_iv: float = 0.5

    def __post_init__(self) -> None:
        if not self.stale_after_s > 0.0:
            raise ValueError("book.stale_after_s must be > 0")
        if not self.max_spread_iv > 0.0:
            raise ValueError("book.max_spread_iv must be > 0 (a fraction: 0.5 = 50 vol points)")


@dataclass(frozen=True)
class ModelSettings:
    names: tuple[str, ...] = ("spline", "svi")  # the surface of record (issue 13) + SVI
    penalty: dict[str, float] = field(default_factory=dict)  # lambda per model (else built-in)
    sabr_beta: float = 1.0
    # residuals to the mid, or beyond the band; None: each model's own default
    objective: Literal["mid", "band"] | None = None
    # per model: CalibConfig fields, "filters" a table of FilterConfig fields (checked when
    # the pipeline builds the model's CalibConfig: ``CalibConfig.for_model``)
    calib: dict[str, dict[str, Any]] = field(default_factory=dict)
    # where the daemon's fits run: a process per model and underlying (streamer.daemon.
    # fitproc: no fit waits for another's GIL), or worker threads of the daemon's process
    workers: Literal["process", "thread"] = "process"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sabr_beta <= 1.0:
            raise ValueError("models.sabr_beta must lie in [0, 1]")
        for name, lam in self.penalty.items():
            if not lam >= 0.0:
                raise ValueError(f"models.penalty.{name} must be >= 0")
        for name, table in self.calib.items():
            if not isinstance(table, Mapping):
                raise ValueError(f"models.calib.{name} must be a table of CalibConfig fields")
            filters = table.get("filters", {})
            if not isinstance(filters, Mapping):
                raise ValueError(f"models.calib.{name}.filters must be a table")

    def calib_overrides(self, name: str) -> dict[str, Any]:
        """What the config sets for model ``name``'s ``CalibConfig``: its ``[models.calib.NAME]``
        table, then ``penalty.NAME`` and ``objective`` where that table does not set them."""
        out: dict[str, Any] = {k: v for k, v in self.calib.get(name, {}).items()}
        if "filters" in out:
            out["filters"] = dict(out["filters"])
        if name in self.penalty and "penalty" not in out:
            out["penalty"] = self.penalty[name]
        if self.objective is not None and "objective" not in out:
            out["objective"] = self.objective
        return out

    def options(self) -> dict[str, dict[str, float]]:
        """Constructor options per model name."""
        return {"sabr": {"beta": self.sabr_beta}}


@dataclass(frozen=True)
class PublishSettings:
    urls: tuple[str, ...] = ("jsonl:-",)
    prefix: str = "streamer"
    greeks: bool = True
    tenors_days: tuple[int, ...] = DEFAULT_TENORS_DAYS

    def __post_init__(self) -> None:
        days = self.tenors_days
        if any(not 1 <= d <= MAX_TENOR_DAYS for d in days):
            raise ValueError(f"publish.tenors_days must lie in [1, {MAX_TENOR_DAYS}] days")
        if any(b <= a for a, b in itertools.pairwise(days)):
            raise ValueError("publish.tenors_days must be increasing, without repeats")


@dataclass(frozen=True)
class RecorderSettings:
    dir: str = ""
    rotate_mb: int = 256
    rotate_minutes: int = 60

    def __post_init__(self) -> None:
        if self.rotate_mb < 1 or self.rotate_minutes < 1:
            raise ValueError("recorder.rotate_mb and recorder.rotate_minutes must be >= 1")


@dataclass(frozen=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    port: int = 0
    allow_remote: bool = False  # a host that is not loopback must be meant

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("metrics.port must lie in [0, 65535] (0 = off)")
        if not self.allow_remote and not is_loopback(self.host):
            raise ValueError(
                f"metrics.host {self.host!r} is not a loopback address: the metrics would be "
                "open to the network; set [metrics] allow_remote = true to mean it"
            )


@dataclass(frozen=True)
class WatchdogSettings:
    fit_s: float = 60.0  # a fit running longer than this holds back WATCHDOG=1
    feed_s: float = 0.0  # a connected feed silent this long does too (0: 2 x dead-after)

    def __post_init__(self) -> None:
        if not self.fit_s > 0.0:
            raise ValueError("watchdog.fit_s must be > 0")
        if not self.feed_s >= 0.0:
            raise ValueError("watchdog.feed_s must be >= 0 (0: twice the feed's dead-after)")


@dataclass(frozen=True)
class WebSettings:
    listen: str = ""  # HOST:PORT of the live page (streamer.tools.web); "" = off
    allow_remote: bool = False  # a host that is not loopback must be meant
    history: int = 3000  # surfaces (and tenors messages) kept per model for the charts

    def __post_init__(self) -> None:
        if not self.listen:
            return
        host, sep, port = self.listen.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"web.listen: expected HOST:PORT, got {self.listen!r}")
        if not self.allow_remote and not is_loopback(host):
            raise ValueError(
                f"web.listen {host!r} is not a loopback address: the page (no login) would be "
                "open to the network; set [web] allow_remote = true to mean it"
            )
        if self.history < 1:
            raise ValueError("web.history must be >= 1")


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "pretty"] = "auto"


@dataclass(frozen=True)
class Config:
    """Everything the daemon reads from its TOML file."""

    instance: str = "streamer"
    feed: FeedSettings = field(default_factory=FeedSettings)
    book: BookSettings = field(default_factory=BookSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    publish: PublishSettings = field(default_factory=PublishSettings)
    recorder: RecorderSettings = field(default_factory=RecorderSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    web: WebSettings = field(default_factory=WebSettings)
    watchdog: WatchdogSettings = field(default_factory=WatchdogSettings)
    log: LogSettings = field(default_factory=LogSettings)


def config_from_table(table: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML table (plus env overrides) into a ``Config``."""
    merged = apply_env(dict(table), os.environ if env is None else env)
    return build(Config, merged)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (None: built-in defaults) and apply ``STREAMER__...`` overrides."""
    table: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            table = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(str(p), "config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(p), f"not valid TOML: {exc}") from None
    return config_from_table(table, env)
