"""Security context, resources, NetworkPolicy, PDBs, Ingress, metrics and the helm test pod."""

from __future__ import annotations

from typing import Any

import pytest

from .chart import FULLNAME, Chart, Manifests


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        ok = {
            "In": value in expr.get("values", []),
            "NotIn": value not in expr.get("values", []),
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[op]
        if not ok:
            return False
    return True


def pods_selected(docs: Manifests, selector: dict[str, Any]) -> set[str]:
    return {
        name for name, tpl in docs.pod_templates() if selects(selector, tpl["metadata"]["labels"])
    }


@pytest.fixture(scope="module")
def everything(chart: Chart) -> Manifests:
    return chart.render(
        {"admin": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}}
    )


def test_every_container_runs_as_non_root_without_capabilities(everything: Manifests) -> None:
    for label, pod in everything.pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert pod["securityContext"]["runAsUser"] == 1000, label
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["capabilities"]["drop"] == ["ALL"], label
            # Ray, vLLM and Triton write caches and sockets all over the image; every other
            # container gets a read-only root and an emptyDir /tmp.
            ray = label.startswith("RayService/")
            assert sc["readOnlyRootFilesystem"] is not ray, label


def test_every_container_has_requests_and_a_memory_limit(everything: Manifests) -> None:
    for label, pod in everything.pod_specs():
        for container in pod["containers"]:
            resources = container["resources"]
            assert resources["requests"], label
            assert "memory" in resources["limits"], label
    autoscaler = everything.get("RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert "memory" in autoscaler["resources"]["limits"]


def test_sets_networkpolicy_so_only_serve_and_worker_reach_redis(everything: Manifests) -> None:
    policy = everything.get("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert pods_selected(everything, policy["spec"]["podSelector"]) == {f"{FULLNAME}-redis"}
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    allowed = set().union(
        *(pods_selected(everything, peer["podSelector"]) for peer in rule["from"])
    )
    assert allowed == {"ray-head", "ray-gpu", f"{FULLNAME}-worker", f"{FULLNAME}-admin"}


def test_networkpolicy_admits_extra_clients_from_values(chart: Chart) -> None:
    extra = {"podSelector": {"matchLabels": {"app": "redis-exporter"}}}
    docs = chart.render({"networkPolicy": {"extraRedisClients": [extra]}})
    (rule,) = docs.get("NetworkPolicy")["spec"]["ingress"]
    assert rule["from"][-1] == extra


def test_disruption_budgets_cover_workers_and_ray_gpu_workers(default: Manifests) -> None:
    budgets = {p["metadata"]["name"]: p["spec"] for p in default.all("PodDisruptionBudget")}
    assert pods_selected(default, budgets[f"{FULLNAME}-worker"]["selector"]) == {
        f"{FULLNAME}-worker"
    }
    assert pods_selected(default, budgets[f"{FULLNAME}-ray-worker"]["selector"]) == {"ray-gpu"}
    assert all(spec["maxUnavailable"] == 1 for spec in budgets.values())


def test_ingress_routes_to_the_rayservice_serve_service(chart: Chart, default: Manifests) -> None:
    assert not default.has("Ingress")
    values = {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "tls", "hosts": ["llm.example.com"]}],
        }
    }
    ingress = chart.render(values).get("Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-serve-svc", "port": {"number": 8000}}


def test_servicemonitor_scrapes_ray_metrics_on_8080_of_every_ray_pod(
    everything: Manifests,
) -> None:
    monitor = everything.get("ServiceMonitor", f"{FULLNAME}-ray")
    service = everything.get("Service", f"{FULLNAME}-ray-metrics")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert pods_selected(everything, {"matchLabels": service["spec"]["selector"]}) == {
        "ray-head",
        "ray-gpu",
    }
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics"}]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_scrapes_workers_when_the_servicemonitor_is_on(everything: Manifests) -> None:
    monitor = everything.get("ServiceMonitor", f"{FULLNAME}-worker")
    service = everything.get("Service", f"{FULLNAME}-worker-metrics")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    # Not Ray's Service too: the Ray pods would be scraped twice, once on a port they lack.
    ray_service = everything.get("Service", f"{FULLNAME}-ray-metrics")
    assert not selects(monitor["spec"]["selector"], ray_service["metadata"]["labels"])
    assert service["spec"]["clusterIP"] == "None"
    assert pods_selected(everything, {"matchLabels": service["spec"]["selector"]}) == {
        f"{FULLNAME}-worker"
    }
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9400, "targetPort": "metrics"}]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == (
        "metrics",
        "/metrics",
        "30s",
    )
    # The Service's targetPort names a port the worker container really has.
    (worker,) = everything.get("Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"][
        "containers"
    ]
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in worker["ports"]


def test_worker_servicemonitor_carries_the_labels_prometheus_selects_on(chart: Chart) -> None:
    docs = chart.render(
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}}
    )
    for name in ("ray", "worker"):
        labels = docs.get("ServiceMonitor", f"{FULLNAME}-{name}")["metadata"]["labels"]
        assert labels["release"] == "prometheus", name


def test_no_worker_scrape_when_worker_metrics_port_is_zero(chart: Chart) -> None:
    docs = chart.render(
        {"metrics": {"serviceMonitor": {"enabled": True}}, "worker": {"metrics": {"port": 0}}}
    )
    assert [m["metadata"]["name"] for m in docs.all("ServiceMonitor")] == [f"{FULLNAME}-ray"]
    assert f"{FULLNAME}-worker-metrics" not in {s["metadata"]["name"] for s in docs.all("Service")}


def test_no_networkpolicy_stands_between_prometheus_and_the_workers(everything: Manifests) -> None:
    # The only policy guards Redis; were one to select the workers, it would have to admit
    # Prometheus on the metrics port.
    for policy in everything.all("NetworkPolicy"):
        assert f"{FULLNAME}-worker" not in pods_selected(everything, policy["spec"]["podSelector"])


def test_no_servicemonitor_unless_enabled(default: Manifests) -> None:
    assert not default.has("ServiceMonitor")
    names = {s["metadata"]["name"] for s in default.all("Service")}
    assert f"{FULLNAME}-worker-metrics" not in names


def test_helm_test_pod_curls_readyz_on_the_serve_service(default: Manifests) -> None:
    pod = default.get("Pod", f"{FULLNAME}-test-readyz")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[0] == "curl" and "--fail" in command
    assert command[-1] == f"http://{FULLNAME}-serve-svc:8000/readyz"


@pytest.mark.parametrize(
    ("release", "fullname"),
    [("prod", "prod-nvfp4-stack"), ("nvfp4-stack-prod", "nvfp4-stack-prod")],
)
def test_names_the_resources_the_cli_patches(chart: Chart, release: str, fullname: str) -> None:
    proc = chart.run("template", release, str(chart.path), "--api-versions", "ray.io/v1")
    assert proc.returncode == 0, proc.stderr
    assert f"name: {fullname}-worker\n" in proc.stdout
    assert f"kind: RayService\nmetadata:\n  name: {fullname}\n" in proc.stdout


def test_keeps_the_rayservice_name_short_enough_for_kuberay(chart: Chart) -> None:
    docs = chart.render(
        {"fullnameOverride": "a-very-long-release-name-that-goes-on-and-on-forever"}
    )
    assert len(docs.get("RayService")["metadata"]["name"]) <= 40
