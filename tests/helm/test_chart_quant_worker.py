"""The quantization worker Deployment: GPUs, placement, clean stops, settings."""

from __future__ import annotations

from typing import Any

import pytest

from .chart import CHART, FULLNAME, Chart, Manifests

WORKER = f"{FULLNAME}-worker"


def worker(docs: Manifests) -> dict[str, Any]:
    return docs.get("Deployment", WORKER)


def container(docs: Manifests) -> dict[str, Any]:
    (only,) = worker(docs)["spec"]["template"]["spec"]["containers"]
    return only


def env(docs: Manifests) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(docs)["env"]}


def test_runs_the_worker_module(default: Manifests) -> None:
    assert container(default)["command"] == ["python3", "-m", "nvfp4_worker"]
    assert container(default)["image"] == "ghcr.io/nvfp4-stack/worker:0.1.0"


def test_takes_the_image_tag_from_values(chart: Chart) -> None:
    docs = chart.render({"image": {"tag": "0.2.0", "registry": "registry.local/ml"}})
    assert container(docs)["image"] == "registry.local/ml/worker:0.2.0"


def test_sets_the_worker_gpu_count_from_worker_gpus(chart: Chart) -> None:
    docs = chart.render({"worker": {"gpus": 2}})
    assert container(docs)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert env(docs)["NVFP4_DEVICE"]["value"] == "cuda"


def test_asks_for_no_gpu_and_runs_on_cpu_when_worker_gpus_is_zero(chart: Chart) -> None:
    docs = chart.render({"worker": {"gpus": 0}})
    assert "nvidia.com/gpu" not in container(docs)["resources"]["limits"]
    assert env(docs)["NVFP4_DEVICE"]["value"] == "cpu"


def test_sets_replicas_and_placement_from_values(chart: Chart) -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["b200"]}]}
                ]
            }
        }
    }
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    values = {
        "worker": {
            "replicas": 3,
            "nodeSelector": {"nvidia.com/gpu.product": "B200"},
            "tolerations": tolerations,
            "affinity": affinity,
        }
    }
    docs = chart.render(values)
    pod = worker(docs)["spec"]["template"]["spec"]
    assert worker(docs)["spec"]["replicas"] == 3
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "B200"}
    assert pod["tolerations"] == tolerations
    assert pod["affinity"] == affinity


def test_gives_a_running_job_120_seconds_to_stop_by_default(
    chart: Chart, default: Manifests
) -> None:
    assert worker(default)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    docs = chart.render({"worker": {"terminationGracePeriodSeconds": 600}})
    assert worker(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600


@pytest.mark.parametrize(
    ("grace_s", "job_s"),
    [(120, "100"), (300, "280"), (30, "10"), (25, "5"), (10, "5"), (0, "5")],
)
def test_gives_a_running_job_the_grace_period_minus_the_margin(
    chart: Chart, grace_s: int, job_s: str
) -> None:
    # The worker's stop after the job's time is up (SIGKILL, wait, delete partial output,
    # re-queue) has the remaining 20 s; 5 s is the least a job gets to stop on its own.
    docs = chart.render({"worker": {"terminationGracePeriodSeconds": grace_s}})
    assert env(docs)["NVFP4_CANCEL_GRACE_S"]["value"] == job_s


def test_gives_a_running_job_280_seconds_in_production(chart: Chart) -> None:
    docs = chart.render(values_file=CHART / "values-prod.yaml")
    grace = worker(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert (grace, env(docs)["NVFP4_CANCEL_GRACE_S"]["value"]) == (300, "280")


def test_never_surges_a_second_pod_onto_busy_gpus(default: Manifests) -> None:
    strategy = worker(default)["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxSurge"] == 0


def test_reads_the_shared_settings_and_the_redis_password_from_the_secret(
    default: Manifests,
) -> None:
    (source,) = container(default)["envFrom"]
    assert source == {"configMapRef": {"name": FULLNAME}}
    variables = env(default)
    assert variables["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": FULLNAME,
        "key": "redis-password",
    }
    assert variables["NVFP4_REDIS_URL"]["value"] == (
        f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis:6379/0"
    )
    names = [e["name"] for e in container(default)["env"]]
    # Kubernetes expands $(REDIS_PASSWORD) only from variables defined before it.
    assert names.index("REDIS_PASSWORD") < names.index("NVFP4_REDIS_URL")


def test_mounts_models_and_the_hugging_face_cache(default: Manifests) -> None:
    mounts = {m["name"]: m["mountPath"] for m in container(default)["volumeMounts"]}
    assert mounts["models"] == "/models"
    assert mounts["hf-cache"] == "/hf-cache"
    volumes = {v["name"]: v for v in worker(default)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-models"


def test_restarts_when_the_configmap_changes(chart: Chart, default: Manifests) -> None:
    def checksum(docs: Manifests) -> str:
        return worker(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(chart.render({"config": {"maxAttempts": 5}})) != checksum(default)
    assert checksum(chart.render({"worker": {"replicas": 4}})) == checksum(default)


def test_restarts_a_worker_whose_heartbeat_went_stale(chart: Chart, default: Manifests) -> None:
    probe = container(default)["livenessProbe"]
    assert probe["exec"]["command"] == ["python3", "-m", "nvfp4_worker.healthcheck"]
    # A Redis outage shorter than this must not restart busy workers.
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 120
    docs = chart.render({"worker": {"livenessProbe": {"enabled": False}}})
    assert "livenessProbe" not in container(docs)


def test_exposes_the_worker_metrics_port_from_worker_metrics_port(
    chart: Chart, default: Manifests
) -> None:
    assert container(default)["ports"] == [
        {"name": "metrics", "containerPort": 9400, "protocol": "TCP"}
    ]
    assert env(default)["NVFP4_WORKER_METRICS_PORT"]["value"] == "9400"
    docs = chart.render({"worker": {"metrics": {"port": 9500}}})
    assert container(docs)["ports"] == [
        {"name": "metrics", "containerPort": 9500, "protocol": "TCP"}
    ]
    assert env(docs)["NVFP4_WORKER_METRICS_PORT"]["value"] == "9500"


def test_no_metrics_port_when_worker_metrics_port_is_zero(chart: Chart) -> None:
    docs = chart.render({"worker": {"metrics": {"port": 0}}})
    assert "ports" not in container(docs)
    # Written out: left unset, the worker would open its default port anyway.
    assert env(docs)["NVFP4_WORKER_METRICS_PORT"]["value"] == "0"


def test_a_metrics_port_change_restarts_only_the_workers(chart: Chart, default: Manifests) -> None:
    # Not in the shared ConfigMap, whose checksum would also bring up a new Ray cluster.
    docs = chart.render({"worker": {"metrics": {"port": 9500}}})
    assert docs.get("ConfigMap", FULLNAME) == default.get("ConfigMap", FULLNAME)
    assert worker(docs)["spec"]["template"] != worker(default)["spec"]["template"]


def test_keeps_caches_off_the_read_only_root(default: Manifests) -> None:
    variables = env(default)
    mounts = {m["mountPath"] for m in container(default)["volumeMounts"]}
    for name in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        assert any(variables[name]["value"].startswith(m) for m in mounts), name
    assert container(default)["securityContext"]["readOnlyRootFilesystem"] is True
