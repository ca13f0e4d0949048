"""Render the Helm chart with the real helm binary and look at the manifests it makes."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "nvfp4-stack"
HELM = ROOT / ".tools" / "bin" / "helm"
RELEASE = "rel"
FULLNAME = f"{RELEASE}-nvfp4-stack"
# Custom resources the chart renders only when the cluster serves their API.
API_VERSIONS = ["ray.io/v1", "monitoring.coreos.com/v1"]
# Every values file the chart is checked with: the defaults, production and the CI scenarios.
VALUES_FILES = [None, CHART / "values-prod.yaml", *sorted((CHART / "ci").glob("*.yaml"))]


class ChartError(Exception):
    """helm refused to render; the message is helm's stderr."""


def values_id(path: Path | None) -> str:
    return "defaults" if path is None else path.name


def nested(dotted: str, value: Any) -> dict[str, Any]:
    """`nested("worker.gpus", 2)` -> `{"worker": {"gpus": 2}}`."""
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


class Manifests(list[dict[str, Any]]):
    """The documents of one `helm template`."""

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self if d["kind"] == kind]

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def has(self, kind: str) -> bool:
        return bool(self.all(kind))

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(label, pod spec) of every pod the release will run, KubeRay's included."""
        for doc in self:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind in ("Deployment", "StatefulSet"):
                yield f"{kind}/{name}", doc["spec"]["template"]["spec"]
            elif kind == "Pod":
                yield f"Pod/{name}", doc["spec"]
            elif kind == "RayService":
                cluster = doc["spec"]["rayClusterConfig"]
                yield "RayService/head", cluster["headGroupSpec"]["template"]["spec"]
                for group in cluster["workerGroupSpecs"]:
                    yield f"RayService/{group['groupName']}", group["template"]["spec"]

    def pod_templates(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(label, pod template with metadata) of every workload."""
        for doc in self:
            if doc["kind"] in ("Deployment", "StatefulSet"):
                yield doc["metadata"]["name"], doc["spec"]["template"]
            elif doc["kind"] == "Pod":
                yield doc["metadata"]["name"], doc
            elif doc["kind"] == "RayService":
                cluster = doc["spec"]["rayClusterConfig"]
                yield "ray-head", cluster["headGroupSpec"]["template"]
                for group in cluster["workerGroupSpecs"]:
                    yield f"ray-{group['groupName']}", group["template"]


class Chart:
    """The chart under test, driven through the helm binary."""

    def __init__(self, helm: Path, path: Path) -> None:
        self.helm = helm
        self.path = path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.helm), *args], capture_output=True, text=True, timeout=60, check=False
        )

    def template_text(
        self, values: dict[str, Any] | None = None, values_file: Path | None = None
    ) -> str:
        return _template(self, json.dumps(values or {}, sort_keys=True), values_file)

    def render(
        self, values: dict[str, Any] | None = None, values_file: Path | None = None
    ) -> Manifests:
        text = self.template_text(values, values_file)
        return Manifests(d for d in yaml.safe_load_all(text) if d)

    def error(self, values: dict[str, Any]) -> str:
        """helm's error for values it must refuse."""
        with pytest.raises(ChartError) as caught:
            self.render(values)
        return str(caught.value)


@cache
def _template(chart: Chart, values_json: str, values_file: Path | None) -> str:
    # Cached: many tests read the same rendering; helm is deterministic except for the
    # generated secrets, which the tests compare across separate, uncached calls.
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(values_json)
        f.flush()
        args = ["template", RELEASE, str(chart.path), "--namespace", "ml"]
        for api in API_VERSIONS:
            args += ["--api-versions", api]
        if values_file is not None:
            args += ["-f", str(values_file)]
        proc = chart.run(*args, "-f", f.name)
    if proc.returncode != 0:
        raise ChartError(proc.stderr.strip())
    return proc.stdout
