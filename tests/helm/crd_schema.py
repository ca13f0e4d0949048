"""Turn a CRD's openAPIV3Schema into a JSON Schema the `jsonschema` package can check.

kubernetes-validate knows only built-in kinds, so the RayService is checked against KubeRay's
own CRD (copied into tests/helm/crds from KubeRay v1.7.0). The API server's structural schema
differs from JSON Schema in three ways that matter here:
- `x-kubernetes-int-or-string: true` accepts an integer or a string;
- `nullable: true` also accepts null;
- unknown fields are pruned (we treat them as errors) unless
  `x-kubernetes-preserve-unknown-fields: true`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent / "crds"
_NESTED_ONE = ("items", "not")
_NESTED_LIST = ("anyOf", "allOf", "oneOf")


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """One openAPIV3Schema node, recursively converted."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in _NESTED_ONE or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_json_schema(value)
        elif key in _NESTED_LIST:
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if out.get("type") == "object" and "properties" in out and not preserve:
        out.setdefault("additionalProperties", False)
    return out


@cache
def crd_validator(filename: str, version: str = "v1") -> jsonschema.Draft7Validator:
    """A validator for one served version of the CRD in tests/helm/crds/<filename>."""
    # The CRD is 1 MB of YAML: libyaml reads it in about a second, pure Python in six.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / filename).read_text(), Loader=loader)  # noqa: S506 (a safe loader)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"{filename} has no version {version}; it has {sorted(versions)}")
    schema = to_json_schema(versions[version]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any], filename: str) -> list[str]:
    """Every schema violation of `doc`, as `path: message` lines (empty when valid)."""
    errors = crd_validator(filename).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
