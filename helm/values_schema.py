"""Generate helm/nvfp4-stack/values.schema.json from values.yaml.

Types come from the default values, descriptions from their `# --` comments (helm-docs
style), and the constraints a default cannot show (bounds, enums, patterns) from the rules
below. The bounds of the serving values (maxModelLen, gpuMemoryUtilization, autoscaling...)
come from the fields of the same name in nvfp4_common.serving, which build_app validates
with, so the chart refuses what the app would. Every object is closed
(`additionalProperties: false`), so a misspelt key fails `helm install` instead of being
ignored.

    .venv/bin/python helm/values_schema.py          # rewrite the schema
    .venv/bin/python helm/values_schema.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo

# build_app owns these engine args; repeating them in engine_kwargs is refused by the app
# as well (nvfp4_common.serving.ServingConfig).
from nvfp4_common.serving import OWNED_ENGINE_ARGS, AutoscalingConfig, ServingConfig

CHART = Path(__file__).resolve().parent / "nvfp4-stack"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"

Schema = dict[str, Any]

QUANTITY: Schema = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[numkMGTPE])?$"}
FREE: Schema = {"type": "object"}
OBJECTS: Schema = {"type": "array", "items": {"type": "object"}}
STRINGS: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
PULL_POLICY: Schema = {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}
ACCESS_MODES: Schema = {
    "type": "array",
    "minItems": 1,
    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
}


def minimum(low: int) -> Schema:
    return {"type": "integer", "minimum": low}


def positive() -> Schema:
    return {"type": "number", "exclusiveMinimum": 0}


# Rules by the key's last name (any depth), then by full dotted path.
BY_NAME: dict[str, Schema] = {
    "resources": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            part: {"type": "object", "additionalProperties": {"type": ["string", "number"]}}
            for part in ("requests", "limits")
        },
    },
    "nodeSelector": STRINGS,
    "tolerations": OBJECTS,
    "affinity": FREE,
    "extraEnv": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}},
        },
    },
    "rayStartParams": {
        "type": "object",
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    },
    "pullPolicy": PULL_POLICY,
    "accessModes": ACCESS_MODES,
    "size": QUANTITY,
}
BY_PATH: dict[str, Schema] = {
    "imagePullSecrets": OBJECTS,
    "podSecurityContext": FREE,
    "securityContext": FREE,
    "config.env": {"enum": ["development", "production"]},
    "config.maxAttempts": minimum(1),
    "config.heartbeatTimeoutS": positive(),
    "config.heartbeatIntervalS": positive(),
    "config.extra": {
        "type": "object",
        "propertyNames": {"pattern": "^[A-Za-z][A-Za-z0-9_]*$"},
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    },
    "secrets.keys.redisPassword": {"type": "string", "minLength": 1},
    "secrets.keys.apiKeys": {"type": "string", "minLength": 1},
    "secrets.keys.hfToken": {"type": "string", "minLength": 1},
    # It is spliced into NVFP4_REDIS_URL.
    "secrets.redisPassword": {"type": "string", "pattern": "^[A-Za-z0-9._~-]*$"},
    "secrets.apiKeys": {
        "type": "array",
        "items": {"type": "string", "minLength": 16, "pattern": r"^\S+$"},
    },
    # Sent in an HTTP Authorization header.
    "secrets.rayAuthToken": {"type": "string", "pattern": r"^\S*$"},
    "redis.externalUrl": {"type": "string", "pattern": "^(rediss?://.+)?$"},
    "redis.appendfsync": {"enum": ["always", "everysec", "no"]},
    "worker.replicas": minimum(0),
    "worker.gpus": minimum(0),
    "worker.terminationGracePeriodSeconds": minimum(0),
    "worker.tmpSize": QUANTITY,
    "worker.livenessProbe.initialDelaySeconds": minimum(0),
    "worker.livenessProbe.periodSeconds": minimum(1),
    "worker.livenessProbe.timeoutSeconds": minimum(1),
    "worker.livenessProbe.failureThreshold": minimum(1),
    "worker.metrics.port": {"type": "integer", "minimum": 0, "maximum": 65535},
    "serve.appName": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
    # Relative to the models volume, and never outside it.
    "serve.modelPath": {
        "type": "string",
        "minLength": 1,
        "pattern": "^[^/]",
        "not": {"pattern": r"(^|/)\.\.(/|$)"},
    },
    "serve.engineKwargs": {
        "type": "object",
        "not": {"anyOf": [{"required": [name]} for name in OWNED_ENGINE_ARGS]},
    },
    "serve.extraArgs": FREE,
    "ray.version": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+"},
    "ray.upgradeStrategy": {"enum": ["NewCluster", "None"]},
    "ray.worker.groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
    "ray.worker.gpus": minimum(1),
    "ray.worker.minReplicas": minimum(0),
    "ray.worker.maxReplicas": minimum(1),
    "ray.worker.shmSize": QUANTITY,
    "ray.autoscaler.idleTimeoutSeconds": minimum(0),
    "ray.autoscaler.upscalingMode": {"enum": ["Conservative", "Default", "Aggressive"]},
    "ray.readiness.path": {"type": "string", "pattern": "^/"},
    "ray.readiness.periodSeconds": minimum(1),
    "ray.readiness.timeoutSeconds": minimum(1),
    "ray.readiness.failureThreshold": minimum(1),
    "ingress.annotations": STRINGS,
    "ingress.tls": OBJECTS,
    "ingress.hosts": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["host", "paths"],
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string"},
                "paths": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["path", "pathType"],
                        "additionalProperties": False,
                        "properties": {
                            "path": {"type": "string", "pattern": "^/"},
                            "pathType": {"enum": ["Prefix", "Exact", "ImplementationSpecific"]},
                        },
                    },
                },
            },
        },
    },
    "metrics.serviceMonitor.interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
    "metrics.serviceMonitor.labels": STRINGS,
    "networkPolicy.extraRedisClients": OBJECTS,
    "podDisruptionBudget.workerMaxUnavailable": minimum(0),
    "podDisruptionBudget.rayWorkerMaxUnavailable": minimum(0),
}
_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))
# Chart values that are serving-config fields: the parent of the key -> the model whose
# field of the same name (camelCase -> snake_case) gives the bounds.
SERVING_MODELS: dict[str, type[BaseModel]] = {
    "serve": ServingConfig,
    "serve.autoscaling": AutoscalingConfig,
}


def field_bounds(info: FieldInfo) -> Schema | None:
    """A numeric field's type and bounds (Field(gt=, ge=, lt=, le=)); None without bounds."""
    kind = next((k for py, k in _TYPES if info.annotation is py), None)
    if kind not in ("integer", "number"):
        return None
    out: Schema = {"type": kind}
    for bound in info.metadata:
        # An integer above n is at least n + 1: the form the other rules use.
        if isinstance(bound, Ge):
            out["minimum"] = bound.ge
        elif isinstance(bound, Gt):
            out.update(
                {"minimum": bound.gt + 1} if kind == "integer" else {"exclusiveMinimum": bound.gt}
            )
        elif isinstance(bound, Le):
            out["maximum"] = bound.le
        elif isinstance(bound, Lt):
            out.update(
                {"maximum": bound.lt - 1} if kind == "integer" else {"exclusiveMaximum": bound.lt}
            )
    return out if len(out) > 1 else None


def serving_rule(path: str) -> Schema | None:
    """The bounds of a serving value from its ServingConfig (or AutoscalingConfig) field."""
    parent, _, key = path.rpartition(".")
    model = SERVING_MODELS.get(parent)
    info = model.model_fields.get(re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()) if model else None
    return field_bounds(info) if info else None


def describe(path: Path) -> dict[str, str]:
    """Dotted key -> its `# --` comment (with the `# ` lines that continue it)."""
    found: dict[str, str] = {}
    keys: list[str] = []
    pending: list[str] = []
    for line in path.read_text().splitlines():
        if m := re.match(r"^\s*# -- (.*)$", line):
            pending = [m.group(1)]
        elif (m := re.match(r"^\s*# (.*)$", line)) and pending:
            pending.append(m.group(1))
        elif m := re.match(r"^(\s*)([A-Za-z][\w-]*):", line):
            keys = [*keys[: len(m.group(1)) // 2], m.group(2)]
            if pending:
                found[".".join(keys)] = " ".join(pending)
            pending = []
        elif not line.lstrip().startswith("#"):
            pending = []
    return found


def schema_of(value: Any, path: str, descriptions: dict[str, str]) -> Schema:
    name = path.rsplit(".", 1)[-1]
    rule = BY_PATH.get(path) or serving_rule(path) or BY_NAME.get(name)
    if rule is not None:
        out = copy.deepcopy(rule)
    elif isinstance(value, dict):
        out = {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                key: schema_of(sub, f"{path}.{key}" if path else key, descriptions)
                for key, sub in value.items()
            },
        }
    else:
        kinds = [kind for py, kind in _TYPES if type(value) is py]
        if not kinds:
            raise SystemExit(
                f"values.yaml: no schema rule for {path} = {value!r}; add one to BY_PATH"
            )
        out = {"type": kinds[0]}
    if path in descriptions:
        out["description"] = descriptions[path]
    return out


def build() -> Schema:
    values = yaml.safe_load(VALUES.read_text())
    schema = schema_of(values, "", describe(VALUES))
    # Helm passes `global` to every chart; allow it so the chart also works as a dependency.
    schema["properties"]["global"] = {"type": "object"}
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": "nvfp4-stack", **schema}


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if SCHEMA.read_text() != text:
            print(f"{SCHEMA} is out of date: run python helm/values_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
