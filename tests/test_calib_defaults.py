"""Per-model calibration defaults (``Model.calib_defaults``): the user's config beats the
model's defaults, which beat ``CalibConfig``'s, field by field (filters too), wherever a
model's ``CalibConfig`` is built (``CalibConfig.for_model``, the pipeline, its config)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from streamer.calib.data import FilterConfig
from streamer.calib.options import CalibConfig
from streamer.config import config_from_table
from streamer.daemon.pipeline import Pipeline
from streamer.errors import ConfigError
from streamer.models import REGISTRY

MODEL_DEFAULTS = {
    "objective": "band",
    "penalty": 3.0,
    "kappa": 0.3,
    "filters": {"min_T_days": 0.1, "iv_floor": 0.002},
}


@pytest.fixture
def svi_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(REGISTRY["svi"], "calib_defaults", MODEL_DEFAULTS)


def test_model_defaults_fill_what_the_user_does_not_set(svi_defaults: None) -> None:
    cfg = CalibConfig.for_model(REGISTRY["svi"])
    want = replace(
        CalibConfig(),
        objective="band",
        penalty=3.0,
        kappa=0.3,
        filters=replace(FilterConfig(), min_T_days=0.1, iv_floor=0.002),
    )
    assert cfg == want


def test_user_fields_win_field_by_field_filters_too(svi_defaults: None) -> None:
    cfg = CalibConfig.for_model(REGISTRY["svi"], {"penalty": 1.0, "filters": {"iv_floor": 0.004}})
    assert cfg.penalty == 1.0  # user
    assert (cfg.objective, cfg.kappa) == ("band", 0.3)  # model
    assert cfg.filters.min_T_days == 0.1  # model
    assert cfg.filters.iv_floor == 0.004  # user
    assert cfg.filters.min_abs_delta == FilterConfig().min_abs_delta  # CalibConfig's
    assert cfg.loss == CalibConfig().loss


def test_config_file_keys_reach_the_pipeline(svi_defaults: None) -> None:
    table = {
        "models": {
            "names": ["svi", "sabr"],
            "objective": "mid",
            "penalty": {"sabr": 7.0},
            "calib": {"svi": {"kappa": 0.5, "filters": {"min_abs_delta": 0.02}}},
        }
    }
    config = config_from_table(table, env={})
    assert config.models.calib_overrides("svi") == {
        "kappa": 0.5,
        "filters": {"min_abs_delta": 0.02},
        "objective": "mid",
    }
    pipe = Pipeline.from_config(config)
    svi = pipe.calib["svi"]
    assert (svi.kappa, svi.objective, svi.penalty) == (0.5, "mid", 3.0)
    assert (svi.filters.min_abs_delta, svi.filters.min_T_days) == (0.02, 0.1)
    sabr = pipe.calib["sabr"]
    want_sabr = CalibConfig.for_model(REGISTRY["sabr"], {"penalty": 7.0, "objective": "mid"})
    assert sabr == want_sabr and sabr.penalty == 7.0 and sabr.objective == "mid"


def test_a_model_table_beats_the_models_wide_keys(svi_defaults: None) -> None:
    table = {"models": {"objective": "mid", "calib": {"svi": {"objective": "band"}}}}
    config = config_from_table(table, env={})
    assert Pipeline.from_config(config, models=["svi"]).calib["svi"].objective == "band"


def test_unset_objective_leaves_the_models_own(svi_defaults: None) -> None:
    config = config_from_table({}, env={})
    assert config.models.objective is None
    assert Pipeline.from_config(config, models=["svi"]).calib["svi"].objective == "band"


def test_pipeline_built_without_configs_uses_the_model_defaults(svi_defaults: None) -> None:
    pipe = Pipeline(models=["svi"])
    assert pipe.calib["svi"].penalty == 3.0 and pipe.calib["svi"].filters.iv_floor == 0.002
    given = CalibConfig(kappa=0.7)
    assert Pipeline(models=["svi"], calib={"svi": given}).calib["svi"] is given


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"svi": {"bogus": 1.0}}, "models.calib.svi.bogus"),
        ({"svi": {"filters": {"min_T_dayz": 1.0}}}, "models.calib.svi.filters.min_T_dayz"),
        ({"svi": {"objective": "nearest"}}, "models.calib.svi.objective"),
    ],
)
def test_bad_model_tables_are_config_errors_naming_the_key(
    table: dict[str, object], key: str
) -> None:
    config = config_from_table({"models": {"calib": table}}, env={})
    with pytest.raises(ConfigError) as err:
        Pipeline.from_config(config, models=["svi"])
    assert key in str(err.value)


def test_a_model_table_must_be_a_table() -> None:
    with pytest.raises(ConfigError):
        config_from_table({"models": {"calib": {"svi": 3}}}, env={})
