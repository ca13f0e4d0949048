"""values.schema.json refuses values of the wrong type or shape before anything renders."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from nvfp4_common.serving import AutoscalingConfig, ServingConfig

from .chart import ROOT, Chart, nested

SCHEMA_ERROR = "values don't meet the specifications of the schema"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("worker.gpus", "two"),
        ("worker.gpus", 1.5),
        ("worker.replicas", -1),
        ("worker.terminationGracePeriodSeconds", "2m"),
        ("worker.gpu", 1),  # misspelt key
        ("config.env", "staging"),
        ("config.maxAttempts", 0),
        ("serve.gpuMemoryUtilization", 1.5),
        ("serve.tensorParallelSize", 0),
        ("serve.modelPath", "../../etc"),
        ("serve.modelPath", "/abs/path"),
        ("serve.maxModelLen", "8k"),
        ("ray.upgradeStrategy", "Recreate"),
        ("ray.worker.gpus", 0),
        ("ray.head.rayStartParams", ["num-cpus=0"]),
        ("redis.enabled", "yes"),
        ("redis.externalUrl", "http://cache:6379"),
        ("redis.appendfsync", "sometimes"),
        ("secrets.redisPassword", "p@ss/word"),
        ("secrets.apiKeys", "one-key-as-a-string"),
        ("secrets.apiKeys", ["short"]),
        ("secrets.rayAuthToken", "two words"),
        ("admin.rbac.create", "yes"),
        ("persistence.models.size", "lots"),
        ("persistence.models.accessModes", ["ReadWriteSometimes"]),
        ("ingress.hosts", [{"host": "a.example.com", "paths": [{"path": "api"}]}]),
        ("metrics.serviceMonitor.interval", 30),
        ("worker.metrics.port", 70000),
        ("worker.metrics.port", -1),
        ("worker.metrics.port", "9400"),
    ],
)
def test_refuses_a_wrong_type_via_the_schema(chart: Chart, key: str, value: Any) -> None:
    error = chart.error(nested(key, value))
    assert SCHEMA_ERROR in error
    assert key.rsplit(".", 1)[0] in error, error


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("worker.gpus", 0),
        ("serve.modelPath", "org/model-nvfp4"),
        ("secrets.redisPassword", "Abc-123_x.y~z"),
        ("redis.externalUrl", ""),
        ("config.extra", {"RESULT_TTL_S": 60}),
        ("ray.head.rayStartParams", {"num-cpus": 0}),
        ("global", {"anything": True}),
        ("worker.metrics.port", 0),
    ],
)
def test_accepts_valid_values(chart: Chart, key: str, value: Any) -> None:
    chart.render(nested(key, value))


def test_the_schema_is_generated_from_values_yaml() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "helm" / "values_schema.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _within(schema: dict[str, Any], value: float) -> bool:
    return (
        value >= schema.get("minimum", -math.inf)
        and value > schema.get("exclusiveMinimum", -math.inf)
        and value <= schema.get("maximum", math.inf)
        and value < schema.get("exclusiveMaximum", math.inf)
    )


@pytest.mark.parametrize(
    ("key", "model", "field"),
    [
        ("maxModelLen", ServingConfig, "max_model_len"),
        ("gpuMemoryUtilization", ServingConfig, "gpu_memory_utilization"),
        ("tensorParallelSize", ServingConfig, "tensor_parallel_size"),
        ("autoscaling.minReplicas", AutoscalingConfig, "min_replicas"),
        ("autoscaling.maxReplicas", AutoscalingConfig, "max_replicas"),
        ("autoscaling.targetOngoingRequests", AutoscalingConfig, "target_ongoing_requests"),
    ],
)
def test_serve_bounds_are_those_of_the_serving_config(
    key: str, model: type[BaseModel], field: str
) -> None:
    # The chart refuses what build_app's serving config refuses, and no more.
    schema = json.loads((ROOT / "helm" / "nvfp4-stack" / "values.schema.json").read_text())
    rule = schema["properties"]["serve"]
    for part in key.split("."):
        rule = rule["properties"][part]
    info = model.model_fields[field]
    check = TypeAdapter(Annotated[info.annotation, *info.metadata])
    for value in (-1, 0, 0.5, 1, 1.5, 2, 4096):
        if rule["type"] == "integer" and value != int(value):
            continue
        try:
            check.validate_python(value)
            valid = True
        except ValidationError:
            valid = False
        assert _within(rule, value) == valid, (key, value)
