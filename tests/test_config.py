"""The daemon's TOML config: defaults, the shipped example files, and errors that name keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.config import Config, load_config
from streamer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert cfg.publish.urls == ("jsonl:-",)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[log]\nlevel = "loud"\n', "log.level", "allowed: 'debug', 'info', 'warning', 'error'"),
        ('[trigger]\nmin_interval_s = "soon"\n', "trigger.min_interval_s", "a number"),
        ("[feed]\nheartbeat_s = 5.0\n", "feed", "at least 10 s"),
        ("[publsh]\nurls = []\n", "publsh", "allowed here:"),
        ('[feed]\nvenue = "ftx"\n', "feed.venue", "'deribit', 'ccxt'"),
    ],
)
def test_errors_name_key_and_allowed_values(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), env={})
    assert info.value.key == key
    assert words in str(info.value)


def test_unknown_model_lists_the_registry(tmp_path: Path) -> None:
    from streamer.daemon.pipeline import Pipeline

    config = load_config(_write(tmp_path, '[models]\nnames = ["nope"]\n'), env={})
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(config)
    assert info.value.key == "models.names[0]"
    assert "unknown model 'nope'" in str(info.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[log\n"), env={})


def test_env_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, '[log]\nlevel = "info"\n'),
        env={"STREAMER__LOG__LEVEL": "debug", "STREAMER__METRICS__PORT": "9108"},
    )
    assert cfg.log.level == "debug"
    assert cfg.metrics.port == 9108


@pytest.mark.parametrize("name", ["default.toml", "deribit.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = load_config(REPO / "config" / name, env={})
    assert cfg.models.names
