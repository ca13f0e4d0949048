"""Scaling the quantization workers: Docker Compose (Docker SDK) or Kubernetes (Helm).

Both clients are optional (`pip install 'nvfp4-stack[admin-scale]'`) and imported only
here, when a scale is asked for. Scaling down stops workers with SIGTERM and a grace
period: a worker re-queues the job it was running, so no job is lost.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from nvfp4_common.errors import Nvfp4Error

# Compose v2 labels every container it creates with these.
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"


class ScaleError(Nvfp4Error, RuntimeError):
    """Scaling could not be done; the message says why and what to do."""


@dataclass(frozen=True)
class ScaleResult:
    before: int
    after: int
    target: str


def worker_deployment_name(release: str, chart: str = "nvfp4-stack") -> str:
    """The worker Deployment's name, as the chart's nvfp4.fullname helper builds it."""
    base = release if chart in release else f"{release}-{chart}"
    return f"{base[:63].rstrip('-')}-worker"


# --- Docker Compose -----------------------------------------------------------------------


def scale_compose(
    project: str, service: str, replicas: int, stop_timeout_s: int, max_replicas: int
) -> ScaleResult:
    """Scale a compose service the way `docker compose up --scale` does.

    Extra containers are clones of an existing one (same image, command, environment,
    mounts, devices and networks), numbered after the highest; surplus ones are stopped
    from the highest number down and removed. More than `max_replicas` is refused before
    Docker is asked anything: every clone reserves the same GPU (compose's device
    reservation does not make it exclusive), and the node's memory split holds one
    quantization job beside serving, not two.
    """
    if replicas > max_replicas:
        raise ScaleError(
            f"refusing to run {replicas} compose workers: NVFP4_COMPOSE_MAX_WORKERS is"
            f" {max_replicas}, because compose workers share one GPU with serving and its"
            " memory split fits one job at a time; raise NVFP4_COMPOSE_MAX_WORKERS in .env"
            " if the GPU has memory for more"
        )
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise ScaleError(
            "scaling compose workers needs the Docker SDK: pip install 'nvfp4-stack[admin-scale]'"
        ) from None
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as e:
        raise ScaleError(f"cannot reach the Docker engine: {e}") from None
    try:
        before = _scale_containers(client, project, service, replicas, stop_timeout_s)
    except DockerException as e:
        # The engine's own reason, on one line (an API error's explanation is its message).
        reason = " ".join(str(getattr(e, "explanation", None) or e).split())
        raise ScaleError(f"the container engine refused to scale {service}: {reason}") from None
    return ScaleResult(before=before, after=replicas, target=f"compose {project}/{service}")


def _scale_containers(
    client: Any, project: str, service: str, replicas: int, stop_timeout_s: int
) -> int:
    """Start or stop the service's containers until `replicas` run; returns how many ran."""
    labels = [f"{PROJECT_LABEL}={project}", f"{SERVICE_LABEL}={service}"]
    containers = client.containers.list(all=True, filters={"label": labels})
    if not containers:
        raise ScaleError(
            f"no containers of service {service!r} in compose project {project!r};"
            " start the stack first (docker compose up -d) or set NVFP4_COMPOSE_PROJECT"
        )
    containers.sort(key=_number)
    running = [c for c in containers if c.status == "running"]
    before = len(running)
    if replicas < before:
        for c in sorted(running, key=_number, reverse=True)[: before - replicas]:
            c.stop(timeout=stop_timeout_s)
            c.remove()
    elif replicas > before:
        missing = replicas - before
        for c in [c for c in containers if c.status != "running"][:missing]:
            c.start()
            missing -= 1
        template = client.api.inspect_container((running or containers)[0].id)
        next_number = max(_number(c) for c in containers) + 1
        for i in range(missing):
            config, name = clone_config(template, project, service, next_number + i)
            created = client.api.create_container_from_config(config, name=name)
            for net, endpoint in list(template["NetworkSettings"]["Networks"].items())[1:]:
                client.api.connect_container_to_network(
                    created["Id"], net, aliases=[service, *(endpoint.get("Aliases") or [])]
                )
            client.api.start(created["Id"])
    return before


def clone_config(
    inspected: dict[str, Any], project: str, service: str, number: int
) -> tuple[dict[str, Any], str]:
    """A create-container body that copies an inspected container as replica `number`."""
    config = {k: v for k, v in inspected["Config"].items() if k not in ("Hostname", "MacAddress")}
    config["Labels"] = {**(config.get("Labels") or {}), NUMBER_LABEL: str(number)}
    config["HostConfig"] = dict(inspected["HostConfig"])
    if config["HostConfig"].get("Ulimits"):
        # Podman's inspect names them "RLIMIT_NOFILE", which its own create (and Docker's)
        # rejects as "invalid ulimit type": Docker's names are "nofile".
        config["HostConfig"]["Ulimits"] = [
            {**u, "Name": u["Name"].lower().removeprefix("rlimit_")}
            for u in config["HostConfig"]["Ulimits"]
        ]
    networks = list(inspected["NetworkSettings"]["Networks"].items())
    if networks:
        net, endpoint = networks[0]
        aliases = [a for a in (endpoint.get("Aliases") or []) if a != inspected["Id"][:12]]
        config["NetworkingConfig"] = {
            "EndpointsConfig": {net: {"Aliases": sorted({service, *aliases})}}
        }
    return config, f"{project}-{service}-{number}"


def _number(container: Any) -> int:
    try:
        return int(container.labels.get(NUMBER_LABEL, "0"))
    except ValueError:
        return 0


# --- Kubernetes ---------------------------------------------------------------------------


def scale_kubernetes(namespace: str, deployment: str, replicas: int) -> ScaleResult:
    """Patch the worker Deployment's scale, with the kubernetes client or else kubectl."""
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        return _scale_kubectl(namespace, deployment, replicas)
    try:
        try:
            config.load_incluster_config()
        except ConfigException:
            config.load_kube_config()
    except (ConfigException, OSError) as e:
        raise ScaleError(f"no Kubernetes credentials (in-cluster or ~/.kube/config): {e}") from None
    apps = client.AppsV1Api()
    try:
        scale = apps.read_namespaced_deployment_scale(deployment, namespace)
        before = int((scale.spec.replicas if scale.spec else 0) or 0)
        apps.patch_namespaced_deployment_scale(
            deployment, namespace, {"spec": {"replicas": replicas}}
        )
    except ApiException as e:
        raise ScaleError(
            f"Kubernetes refused to scale deployment {namespace}/{deployment}:"
            f" {e.status} {e.reason} (check NVFP4_HELM_RELEASE and NVFP4_K8S_NAMESPACE)"
        ) from None
    return ScaleResult(before=before, after=replicas, target=f"deployment {namespace}/{deployment}")


def kubectl_scale_args(namespace: str, deployment: str, replicas: int) -> list[str]:
    return [
        "kubectl",
        "-n",
        namespace,
        "scale",
        f"deployment/{deployment}",
        f"--replicas={replicas}",
    ]


def _scale_kubectl(namespace: str, deployment: str, replicas: int) -> ScaleResult:
    if shutil.which("kubectl") is None:
        raise ScaleError(
            "scaling on Kubernetes needs the kubernetes client"
            " (pip install 'nvfp4-stack[admin-scale]') or kubectl on PATH"
        )
    get = ["kubectl", "-n", namespace, "get", f"deployment/{deployment}"]
    out = subprocess.run(
        [*get, "-o", "jsonpath={.spec.replicas}"], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise ScaleError(f"kubectl: {out.stderr.strip() or out.stdout.strip()}")
    before = int(out.stdout.strip() or 0)
    done = subprocess.run(
        kubectl_scale_args(namespace, deployment, replicas),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise ScaleError(f"kubectl: {done.stderr.strip() or done.stdout.strip()}")
    return ScaleResult(before=before, after=replicas, target=f"deployment {namespace}/{deployment}")
