"""The serving configuration has one home, nvfp4_common.serving.ServingConfig: the
NVFP4_SERVE_* settings, build_app's args, the CLI's arg names and the Helm schema's
owned engine args are all derived from it. No Ray, no vLLM."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from nvfp4_admin import serve_config as sc
from nvfp4_common import serving
from nvfp4_common.serving import AutoscalingConfig, ServeArgs, ServingConfig
from nvfp4_common.settings import Settings
from nvfp4_serve.config import load_args

ROOT = Path(__file__).resolve().parents[2]


def settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


def _setting_of(arg: str) -> str:
    return serving.SETTING_PREFIX + arg


def test_every_field_says_what_it_is() -> None:
    for model in (ServingConfig, ServeArgs, AutoscalingConfig):
        missing = [n for n, f in model.model_fields.items() if not f.description]
        assert not missing, f"{model.__name__}: add description= to {missing}"


def test_every_serve_arg_but_the_deploys_own_is_a_setting_with_the_same_rule() -> None:
    """Same default, description and bounds in the setting as in the arg."""
    per_deploy = set(ServeArgs.model_fields) - set(ServingConfig.model_fields)
    assert per_deploy == {"model_aliases"}
    for name, arg in ServingConfig.model_fields.items():
        setting = Settings.model_fields[_setting_of(name)]
        if name == "autoscaling":
            assert setting.annotation is bool and setting.default is False
            assert setting.description == arg.description
            for sub, sub_arg in AutoscalingConfig.model_fields.items():
                flat = Settings.model_fields[_setting_of(sub)]
                assert (flat.default, flat.description, flat.metadata) == (
                    sub_arg.default,
                    sub_arg.description,
                    sub_arg.metadata,
                ), sub
            continue
        assert setting.annotation == arg.annotation, name
        assert setting.description == arg.description, name
        assert setting.metadata == arg.metadata, name
        assert setting.get_default(call_default_factory=True) == arg.get_default(
            call_default_factory=True
        ), name
        if name != "model":  # required in ServeArgs, optional as a setting
            assert ServeArgs.model_fields[name].default == arg.default, name


def test_the_default_settings_are_the_default_args() -> None:
    args = load_args(settings(), {"model": "org/m"})
    expected = ServeArgs(model="org/m")
    assert args == expected


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ("NVFP4_SERVE_MAX_MODEL_LEN", "max_model_len", 4096),
        ("NVFP4_SERVE_CPU_WEIGHT_CACHE", "cpu_weight_cache", False),
        ("NVFP4_SERVE_ENGINE_KWARGS", "engine_kwargs", {"enforce_eager": True}),
        ("NVFP4_SERVE_FIRST_CHUNK_NOW", "first_chunk_now", False),
    ],
)
def test_flat_environment_variables_still_set_the_args(
    monkeypatch: pytest.MonkeyPatch, env: str, field: str, value: object
) -> None:
    monkeypatch.setenv(env, json.dumps(value) if isinstance(value, dict) else str(value))
    monkeypatch.setenv("NVFP4_SERVE_MODEL", "/m/a")
    assert getattr(load_args(settings(), None), field) == value


def test_autoscaling_settings_become_the_autoscaling_arg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVFP4_SERVE_AUTOSCALING", "true")
    monkeypatch.setenv("NVFP4_SERVE_MIN_REPLICAS", "0")
    args = load_args(settings(serve_model="m"), None)
    assert args.autoscaling == AutoscalingConfig(min_replicas=0, max_replicas=2)
    assert load_args(settings(serve_model="m"), {"autoscaling": None}).autoscaling is None


def test_cpu_weight_cache_is_an_arg_and_a_setting() -> None:
    assert (
        load_args(settings(serve_model="m"), {"cpu_weight_cache": False}).cpu_weight_cache is False
    )
    assert settings(serve_cpu_weight_cache=False).serving.cpu_weight_cache is False
    assert settings().serving.cpu_weight_cache is True


def test_the_clis_arg_names_are_the_models() -> None:
    for name in serving.DEPLOY_ARGS:
        assert name in ServeArgs.model_fields, name
    assert (sc.MODEL_ARG, sc.SERVED_NAME_ARG, sc.ALIASES_ARG, sc.AUTOSCALING_ARG) == (
        serving.MODEL_ARG,
        serving.SERVED_NAME_ARG,
        serving.ALIASES_ARG,
        serving.AUTOSCALING_ARG,
    )
    assert tuple(AutoscalingConfig.model_fields) == serving.AUTOSCALING_KEYS
    app = {"args": {sc.MODEL_ARG: "/models/org/m-nvfp4/"}}
    assert sc.served_name(app) == ServeArgs(model="/models/org/m-nvfp4/").served_name


def test_the_helm_schema_refuses_the_engine_args_the_model_owns() -> None:
    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "helm/values_schema.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OWNED_ENGINE_ARGS is serving.OWNED_ENGINE_ARGS
    schema = json.loads((ROOT / "helm/nvfp4-stack/values.schema.json").read_text())
    refused = schema["properties"]["serve"]["properties"]["engineKwargs"]["not"]["anyOf"]
    assert [r["required"][0] for r in refused] == list(serving.OWNED_ENGINE_ARGS)
    for name in serving.OWNED_ENGINE_ARGS:
        assert name in ServingConfig.model_fields
        with pytest.raises(ValueError, match="use the top-level args"):
            load_args(settings(), {"model": "m", "engine_kwargs": {name: 1}})
