"""Serving runs as a KubeRay RayService: its Serve config, head, GPU workers and upgrades."""

from __future__ import annotations

from typing import Any

import yaml

from nvfp4_common.serving import RAY_ENV_DEFAULTS, RAY_ENV_INGRESS

from .chart import FULLNAME, Chart, Manifests


def serve_app(docs: Manifests) -> dict[str, Any]:
    config = yaml.safe_load(docs.get("RayService")["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return app


def cluster(docs: Manifests) -> dict[str, Any]:
    return docs.get("RayService")["spec"]["rayClusterConfig"]


def gpu_group(docs: Manifests) -> dict[str, Any]:
    (group,) = cluster(docs)["workerGroupSpecs"]
    return group


def test_is_named_after_the_release_for_the_cli(default: Manifests) -> None:
    assert default.get("RayService")["metadata"]["name"] == FULLNAME


def test_imports_build_app_with_the_model_under_the_models_mount(chart: Chart) -> None:
    app = serve_app(chart.render({"serve": {"modelPath": "org/qwen3-8b-nvfp4"}}))
    assert app["import_path"] == "nvfp4_serve.app:build_app"
    assert app["route_prefix"] == "/"
    assert app["args"]["model"] == "/models/org/qwen3-8b-nvfp4"
    assert app["args"]["model_name"] == "qwen3-8b-nvfp4"
    assert app["args"]["accelerator"] == "gpu"


def test_passes_engine_and_autoscaling_values_as_build_app_args(chart: Chart) -> None:
    values = {
        "serve": {
            "servedModelName": "qwen3",
            "maxModelLen": 4096,
            "gpuMemoryUtilization": 0.8,
            "tensorParallelSize": 2,
            "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "targetOngoingRequests": 8},
            "engineKwargs": {"enforce_eager": True},
            "extraArgs": {"readiness_prompt": "Hi"},
        },
        "ray": {"worker": {"gpus": 2, "maxReplicas": 3}},
    }
    args = serve_app(chart.render(values))["args"]
    assert args["model_name"] == "qwen3"
    assert args["max_model_len"] == 4096
    assert args["gpu_memory_utilization"] == 0.8
    assert args["tensor_parallel_size"] == 2
    assert args["autoscaling"] == {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_ongoing_requests": 8,
    }
    assert args["engine_kwargs"] == {"enforce_eager": True}
    assert args["readiness_prompt"] == "Hi"


def test_serve_proxy_listens_on_8000(default: Manifests) -> None:
    config = yaml.safe_load(default.get("RayService")["spec"]["serveConfigV2"])
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}


def test_head_has_no_gpus_and_serves_the_dashboard_on_8265(default: Manifests) -> None:
    head = cluster(default)["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (container,) = head["template"]["spec"]["containers"]
    assert {"name": "dashboard", "containerPort": 8265} in container["ports"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_user_start_params_cannot_give_the_head_gpus(chart: Chart) -> None:
    docs = chart.render({"ray": {"head": {"rayStartParams": {"num-gpus": "1", "num-cpus": 0}}}})
    params = cluster(docs)["headGroupSpec"]["rayStartParams"]
    assert params["num-gpus"] == "0"
    assert params["num-cpus"] == "0"


def test_sets_the_ray_worker_gpus_and_replica_bounds_from_values(chart: Chart) -> None:
    docs = chart.render(
        {"ray": {"worker": {"gpus": 4, "minReplicas": 2, "maxReplicas": 5, "groupName": "h100"}}}
    )
    group = gpu_group(docs)
    assert group["groupName"] == "h100"
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 5)
    assert group["rayStartParams"]["num-gpus"] == "4"
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_enables_in_tree_autoscaling(chart: Chart) -> None:
    docs = chart.render({"ray": {"autoscaler": {"upscalingMode": "Aggressive"}}})
    assert cluster(docs)["enableInTreeAutoscaling"] is True
    assert cluster(docs)["autoscalerOptions"]["upscalingMode"] == "Aggressive"


def test_rolls_out_cluster_changes_as_a_new_cluster(default: Manifests) -> None:
    assert default.get("RayService")["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_a_new_model_changes_the_ray_cluster_spec_so_kuberay_starts_a_new_cluster(
    chart: Chart,
) -> None:
    def pod_annotations(values: dict[str, Any]) -> dict[str, str]:
        return gpu_group(chart.render(values))["template"]["metadata"]["annotations"]

    old = pod_annotations({"serve": {"modelPath": "a-nvfp4"}})
    new = pod_annotations({"serve": {"modelPath": "b-nvfp4"}})
    assert old["checksum/serve-config"] != new["checksum/serve-config"]
    in_place = pod_annotations(
        {"serve": {"modelPath": "b-nvfp4", "newClusterOnModelChange": False}}
    )
    assert "checksum/serve-config" not in in_place


def test_worker_readiness_waits_for_the_apps_readyz_on_the_serve_port(default: Manifests) -> None:
    (container,) = gpu_group(default)["template"]["spec"]["containers"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe == {"path": "/readyz", "port": "serve"}
    assert {"name": "serve", "containerPort": 8000} in container["ports"]


def test_keeps_serve_traffic_off_the_head(default: Manifests) -> None:
    assert default.get("RayService")["spec"]["excludeHeadPodFromServeSvc"] is True


def test_turns_on_ray_token_auth_unless_disabled(chart: Chart, default: Manifests) -> None:
    # The token lives in the release's Secret (see test_chart_admin), not a per-cluster one.
    assert cluster(default)["authOptions"] == {"mode": "token", "secretName": FULLNAME}
    docs = chart.render({"ray": {"authEnabled": False}})
    assert cluster(docs)["authOptions"] == {"mode": "disabled"}


def test_ray_pods_get_redis_url_and_the_api_keys_file(default: Manifests) -> None:
    for group in (cluster(default)["headGroupSpec"], gpu_group(default)):
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["NVFP4_REDIS_URL"]["value"].startswith("redis://:$(REDIS_PASSWORD)@")
        keys_file = env["NVFP4_SERVE_API_KEY_FILE"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        (item,) = volumes["api-keys"]["secret"]["items"]
        assert keys_file == f"{mounts['api-keys']}/{item['path']}"
        assert mounts["models"] == "/models"


def ray_serve_env(group: dict[str, Any]) -> dict[str, str]:
    (container,) = group["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("RAY_SERVE_")}


def test_ray_pods_run_serve_with_the_shared_env_defaults(default: Manifests) -> None:
    """Head and GPU workers get exactly nvfp4_common.serving.RAY_ENV_DEFAULTS, the defaults
    compose, the local stack and the test cluster use (tests/deploy checks compose's)."""
    for group in (cluster(default)["headGroupSpec"], gpu_group(default)):
        assert ray_serve_env(group) == RAY_ENV_DEFAULTS


def test_throughput_optimized_serve_can_be_turned_off(chart: Chart) -> None:
    docs = chart.render({"ray": {"throughputOptimized": False}})
    for group in (cluster(docs)["headGroupSpec"], gpu_group(docs)):
        env = ray_serve_env(group)
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"


def test_direct_streaming_is_one_switch(chart: Chart) -> None:
    docs = chart.render({"ray": {"directStreaming": False}})
    for group in (cluster(docs)["headGroupSpec"], gpu_group(docs)):
        assert ray_serve_env(group) == {**RAY_ENV_DEFAULTS, **RAY_ENV_INGRESS}


def test_extra_env_comes_after_the_defaults_so_it_can_change_them(chart: Chart) -> None:
    # Kubernetes keeps the last of two entries with one name.
    extra = [{"name": "RAY_SERVE_ENABLE_DIRECT_INGRESS", "value": "1"}]
    docs = chart.render({"ray": {"extraEnv": extra}})
    (container,) = gpu_group(docs)["template"]["spec"]["containers"]
    assert container["env"][-1] == extra[0]


def test_refuses_tensor_parallel_wider_than_a_ray_worker_pod(chart: Chart) -> None:
    error = chart.error({"serve": {"tensorParallelSize": 2}, "ray": {"worker": {"gpus": 1}}})
    assert "serve.tensorParallelSize (2) exceeds ray.worker.gpus (1)" in error


def test_refuses_more_serve_replicas_than_the_worker_group_can_hold(chart: Chart) -> None:
    values = {
        "serve": {"autoscaling": {"maxReplicas": 4}},
        "ray": {"worker": {"gpus": 1, "maxReplicas": 2}},
    }
    assert "needs 4 GPUs but ray.worker.maxReplicas x ray.worker.gpus gives 2" in chart.error(
        values
    )


def test_refuses_min_replicas_above_max(chart: Chart) -> None:
    error = chart.error({"serve": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}})
    assert "minReplicas must not exceed serve.autoscaling.maxReplicas" in error
