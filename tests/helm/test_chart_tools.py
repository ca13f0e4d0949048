"""The chart passes the real tools: helm lint, Kubernetes' schemas and KubeRay's CRD."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from .chart import ROOT, VALUES_FILES, Chart, values_id
from .crd_schema import crd_errors

KUBERNETES_VERSION = "1.32.0"
RAYSERVICE_CRD = "ray.io_rayservices.yaml"
# API groups of custom resources (checked against their CRDs, not by kubernetes-validate).
CUSTOM_GROUPS = {"ray.io", "monitoring.coreos.com"}
KUBERNETES_VALIDATE = ROOT / ".venv" / "bin" / "kubernetes-validate"


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)
def test_lint_strict_passes(chart: Chart, values_file: Path | None) -> None:
    extra = ["-f", str(values_file)] if values_file else []
    proc = chart.run("lint", "--strict", str(chart.path), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.fixture(scope="module")
def validation(chart: Chart, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict]:
    """kubernetes-validate run once over the built-in kinds of every rendering: (exit code,
    its output, {values id: (file, number of resources)}). It takes about 0.1 s a resource,
    so a resource identical to one of an earlier rendering is not checked again."""
    folder = tmp_path_factory.mktemp("rendered")
    files, seen = {}, set()
    for values_file in VALUES_FILES:
        built_in = []
        for doc in chart.render(values_file=values_file):
            key = json.dumps(doc, sort_keys=True)
            if doc["apiVersion"].split("/")[0] not in CUSTOM_GROUPS and key not in seen:
                seen.add(key)
                built_in.append(doc)
        path = folder / f"{values_id(values_file)}.yaml"
        path.write_text(yaml.safe_dump_all(built_in))
        files[values_id(values_file)] = (path, len(built_in))
    proc = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "-k", KUBERNETES_VERSION]
        + [str(path) for path, _ in files.values()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr, files


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)
def test_built_in_kinds_match_the_kubernetes_schemas(
    validation: tuple[int, str, dict], values_file: Path | None
) -> None:
    code, output, files = validation
    path, count = files[values_id(values_file)]
    assert count >= 10 or values_file is not None, "too few built-in resources rendered"
    lines = [line for line in output.splitlines() if f" {path} " in line]
    assert len([line for line in lines if " passed for resource " in line]) == count, output
    assert code == 0, output


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)
def test_rayservice_matches_the_kuberay_crd(chart: Chart, values_file: Path | None) -> None:
    rayservice = chart.render(values_file=values_file).get("RayService")
    assert crd_errors(rayservice, RAYSERVICE_CRD) == []


def test_crd_check_catches_wrong_types_and_unknown_fields(default) -> None:
    rayservice = copy.deepcopy(default.get("RayService"))
    cluster = rayservice["spec"]["rayClusterConfig"]
    cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    rayservice["spec"]["upgradeStrategy"]["strategy"] = "NewCluster"  # no such field
    errors = crd_errors(rayservice, RAYSERVICE_CRD)
    assert any("num-gpus" in e and "not of type 'string'" in e for e in errors), errors
    assert any("'strategy' was unexpected" in e for e in errors), errors
