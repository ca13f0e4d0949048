"""`nvfp4ctl workers scale`: compose (Docker SDK) and Kubernetes (Helm release) backends.

There is no Docker engine and no Kubernetes cluster on the test machines, so each test
talks to a small local server that answers the few endpoints the real clients call
(Docker Engine API over a unix socket; the apps/v1 Deployment scale subresource). The
clients themselves (docker, kubernetes) are the real packages. The worker Deployment's
name is checked against the real Helm chart rendered by helm when it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import socketserver
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner

from nvfp4_admin.cli import cli
from nvfp4_admin.scaler import (
    NUMBER_LABEL,
    PROJECT_LABEL,
    SERVICE_LABEL,
    clone_config,
    worker_deployment_name,
)

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"


class _Handler(BaseHTTPRequestHandler):
    route: Any = None

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, code: int, data: Any) -> None:
        body = (
            b""
            if data is None
            else (data if isinstance(data, bytes) else json.dumps(data).encode())
        )
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:  # a client may hang up right after a 204's headers
            self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        code, data = type(self).route(self.command, url.path, query, body)
        self._reply(code, data)

    do_GET = do_POST = do_DELETE = do_PATCH = _handle


# --- Docker --------------------------------------------------------------------------------


class FakeDocker:
    """Containers as the Engine API describes them; records stops with their timeout."""

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.stops: list[tuple[str, str]] = []
        self.connects: list[tuple[str, str]] = []
        self.refuse_create: str | None = None  # an engine error message for /containers/create

    def add(self, project: str, service: str, number: int, running: bool = True) -> None:
        cid = f"{project}{service}{number}".ljust(64, "0")
        self.containers[cid] = {
            "Id": cid,
            "Name": f"/{project}-{service}-{number}",
            "State": {"Status": "running" if running else "exited"},
            "Config": {
                "Hostname": cid[:12],
                "Image": "nvfp4-worker:latest",
                "Cmd": ["python", "-m", "nvfp4_worker"],
                "Env": ["NVFP4_REDIS_URL=redis://redis:6379/0"],
                "Labels": {
                    PROJECT_LABEL: project,
                    SERVICE_LABEL: service,
                    NUMBER_LABEL: str(number),
                },
            },
            "HostConfig": {
                "Binds": ["models:/data/models"],
                "DeviceRequests": [{"Count": -1, "Capabilities": [["gpu"]]}],
            },
            "NetworkSettings": {
                "Networks": {
                    f"{project}_default": {"Aliases": [service, cid[:12]]},
                    f"{project}_jobs": {"Aliases": None},
                }
            },
        }

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        path = re.sub(r"^/v[0-9.]+", "", path)
        if path == "/_ping":
            return 200, b"OK"
        if path == "/version":
            return 200, {"ApiVersion": "1.47", "Version": "27.0"}
        if path == "/containers/json":
            wanted = json.loads(query.get("filters", "{}")).get("label", [])
            out = []
            for c in self.containers.values():
                labels = c["Config"]["Labels"]
                matches = all(labels.get(k) == v for k, _, v in (w.partition("=") for w in wanted))
                if matches and (query.get("all") or c["State"]["Status"] == "running"):
                    out.append({"Id": c["Id"], "Names": [c["Name"]], "Labels": labels})
            return 200, out
        if path == "/containers/create" and self.refuse_create:
            return 500, {"message": self.refuse_create}
        if path == "/containers/create":
            cid = f"new{len(self.containers)}".ljust(64, "0")
            net = dict(body.get("NetworkingConfig", {}).get("EndpointsConfig", {}))
            self.containers[cid] = {
                "Id": cid,
                "Name": "/" + query["name"],
                "State": {"Status": "created"},
                "Config": {
                    k: v for k, v in body.items() if k not in ("HostConfig", "NetworkingConfig")
                },
                "HostConfig": body["HostConfig"],
                "NetworkSettings": {"Networks": net},
            }
            return 201, {"Id": cid, "Warnings": []}
        m = re.match(r"^/containers/([^/]+)(/(\w+))?$", path)
        if m and m.group(1) in self.containers:
            c, action = self.containers[m.group(1)], m.group(3)
            if method == "GET" and action == "json":
                return 200, c
            if action == "start":
                c["State"]["Status"] = "running"
                return 204, None
            if action == "stop":
                self.stops.append((c["Name"], query.get("t", "")))
                c["State"]["Status"] = "exited"
                return 204, None
            if method == "DELETE" and action is None:
                del self.containers[c["Id"]]
                return 204, None
        m = re.match(r"^/networks/([^/]+)/connect$", path)
        if m:
            self.connects.append((m.group(1), body["Container"]))
            return 200, None
        return 404, {"message": f"no route {method} {path}"}


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def fake_docker(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDocker]:
    fake = FakeDocker()
    folder = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))  # unix socket paths are short

    class Handler(_Handler):
        route = staticmethod(fake.route)

        def address_string(self) -> str:
            return "unix"

    server = _UnixServer(str(folder / "docker.sock"), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{folder}/docker.sock")
    yield fake
    server.shutdown()
    server.server_close()
    shutil.rmtree(folder, ignore_errors=True)


def _names(fake: FakeDocker, status: str = "running") -> list[str]:
    return sorted(c["Name"] for c in fake.containers.values() if c["State"]["Status"] == status)


def test_compose_scale_up_clones_and_down_stops_gracefully(fake_docker: FakeDocker) -> None:
    fake_docker.add("nvfp4-stack", "worker", 1)
    fake_docker.add("nvfp4-stack", "worker", 2, running=False)
    fake_docker.add("nvfp4-stack", "serve", 1)
    fake_docker.add("other", "worker", 1)
    env = {
        "NVFP4_COMPOSE_PROJECT": "nvfp4-stack",
        "NVFP4_REDIS_URL": "redis://127.0.0.1:9/0",
        "NVFP4_COMPOSE_MAX_WORKERS": "4",
    }
    out = CliRunner().invoke(cli, ["workers", "scale", "4", "--mode", "compose"], env=env)
    assert out.exit_code == 0, out.output
    assert "compose nvfp4-stack/worker: 1 -> 4 worker(s)" in out.output
    workers = [
        c
        for c in fake_docker.containers.values()
        if c["Config"]["Labels"].get(SERVICE_LABEL) == "worker"
        and c["Config"]["Labels"][PROJECT_LABEL] == "nvfp4-stack"
    ]
    assert sorted(c["Name"] for c in workers if c["State"]["Status"] == "running") == [
        "/nvfp4-stack-worker-1",
        "/nvfp4-stack-worker-2",
        "/nvfp4-stack-worker-3",
        "/nvfp4-stack-worker-4",
    ]
    clone = next(c for c in workers if c["Name"] == "/nvfp4-stack-worker-4")
    assert clone["Config"]["Labels"][NUMBER_LABEL] == "4"
    assert "Hostname" not in clone["Config"]
    assert clone["HostConfig"]["DeviceRequests"] == [{"Count": -1, "Capabilities": [["gpu"]]}]
    assert clone["NetworkSettings"]["Networks"] == {"nvfp4-stack_default": {"Aliases": ["worker"]}}
    assert ("nvfp4-stack_jobs", clone["Id"]) in fake_docker.connects  # second network joined
    out = CliRunner().invoke(
        cli, ["workers", "scale", "1", "--mode", "compose", "--stop-timeout", "30"], env=env
    )
    assert out.exit_code == 0, out.output
    assert fake_docker.stops == [
        ("/nvfp4-stack-worker-4", "30"),
        ("/nvfp4-stack-worker-3", "30"),
        ("/nvfp4-stack-worker-2", "30"),
    ]
    assert "/nvfp4-stack-worker-1" in _names(fake_docker) and "/other-worker-1" in _names(
        fake_docker
    )


def test_compose_refuses_a_second_worker_on_the_shared_gpu(fake_docker: FakeDocker) -> None:
    """One GPU beside serving runs one job at a time: a second compose worker is refused
    in one line that names the setting, before any container is touched."""
    fake_docker.add("nvfp4-stack", "worker", 1)
    fake_docker.add("nvfp4-stack", "worker", 2, running=False)
    before = json.dumps(fake_docker.containers, sort_keys=True)
    out = CliRunner().invoke(cli, ["workers", "scale", "2", "--mode", "compose"])
    assert out.exit_code == 1
    assert out.output.startswith("Error: refusing to run 2 compose workers:")
    assert "NVFP4_COMPOSE_MAX_WORKERS is 1" in out.output and out.output.count("\n") == 1
    assert json.dumps(fake_docker.containers, sort_keys=True) == before
    # Lifted by the setting; scaling back down is always allowed.
    lifted = {"NVFP4_COMPOSE_MAX_WORKERS": "2"}
    out = CliRunner().invoke(cli, ["workers", "scale", "2", "--mode", "compose"], env=lifted)
    assert out.exit_code == 0, out.output
    assert _names(fake_docker) == ["/nvfp4-stack-worker-1", "/nvfp4-stack-worker-2"]
    out = CliRunner().invoke(cli, ["workers", "scale", "1", "--mode", "compose"])
    assert out.exit_code == 0, out.output
    assert _names(fake_docker) == ["/nvfp4-stack-worker-1"]


def test_compose_without_containers_says_what_to_do(fake_docker: FakeDocker) -> None:
    out = CliRunner().invoke(
        cli, ["workers", "scale", "1", "--mode", "compose"], env={"NVFP4_COMPOSE_PROJECT": "absent"}
    )
    assert out.exit_code == 1
    assert "no containers of service 'worker' in compose project 'absent'" in out.output


def test_compose_without_engine_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/no-such-docker.sock")
    out = CliRunner().invoke(cli, ["workers", "scale", "1", "--mode", "compose"])
    assert out.exit_code == 1 and out.output.startswith("Error: cannot reach the Docker engine")
    assert out.output.count("\n") == 1


def test_clone_config_keeps_other_aliases() -> None:
    fake = FakeDocker()
    fake.add("p", "worker", 1)
    (inspected,) = fake.containers.values()
    inspected["NetworkSettings"]["Networks"]["p_default"]["Aliases"].append("quantizer")
    config, name = clone_config(inspected, "p", "worker", 7)
    assert name == "p-worker-7"
    assert config["NetworkingConfig"]["EndpointsConfig"]["p_default"]["Aliases"] == [
        "quantizer",
        "worker",
    ]


def test_clone_config_uses_docker_ulimit_names() -> None:
    """Podman's inspect says RLIMIT_NOFILE; its create, like Docker's, wants nofile."""
    fake = FakeDocker()
    fake.add("p", "worker", 1)
    (inspected,) = fake.containers.values()
    inspected["HostConfig"]["Ulimits"] = [
        {"Name": "RLIMIT_NOFILE", "Soft": 1024, "Hard": 4096},
        {"Name": "nproc", "Soft": 64, "Hard": 64},
    ]
    config, _ = clone_config(inspected, "p", "worker", 2)
    assert config["HostConfig"]["Ulimits"] == [
        {"Name": "nofile", "Soft": 1024, "Hard": 4096},
        {"Name": "nproc", "Soft": 64, "Hard": 64},
    ]
    assert inspected["HostConfig"]["Ulimits"][0]["Name"] == "RLIMIT_NOFILE"  # not changed


def test_compose_engine_refusal_is_one_line(
    fake_docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_docker.add("nvfp4-stack", "worker", 1)
    fake_docker.refuse_create = "invalid ulimit type:\nRLIMIT_NOFILE"
    monkeypatch.setenv("NVFP4_COMPOSE_MAX_WORKERS", "2")
    out = CliRunner().invoke(cli, ["workers", "scale", "2", "--mode", "compose"])
    assert out.exit_code == 1, out.output
    assert out.output == (
        "Error: the container engine refused to scale worker: invalid ulimit type: RLIMIT_NOFILE\n"
    )
    assert _names(fake_docker) == ["/nvfp4-stack-worker-1"]  # nothing else changed


# --- Kubernetes ----------------------------------------------------------------------------


class FakeKubernetes:
    def __init__(self) -> None:
        self.replicas = {("nvfp4", "prod-nvfp4-stack-worker"): 1}
        self.patches: list[Any] = []

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        m = re.match(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$", path)
        key = (m.group(1), m.group(2)) if m else None
        if key not in self.replicas:
            return 404, {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
            }
        if method == "PATCH":
            self.patches.append(body)
            self.replicas[key] = body["spec"]["replicas"]
        return 200, {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {"name": key[1], "namespace": key[0]},
            "spec": {"replicas": self.replicas[key]},
            "status": {"replicas": self.replicas[key]},
        }


@pytest.fixture
def fake_kubernetes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()

    class Handler(_Handler):
        route = staticmethod(fake.route)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"},
                    }
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # The client reads KUBECONFIG once, when it is first imported: another test may have.
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig)
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    server.shutdown()
    server.server_close()


def test_kubernetes_scale_patches_the_release_worker(fake_kubernetes: FakeKubernetes) -> None:
    env = {
        "NVFP4_WORKERS_MODE": "kubernetes",
        "NVFP4_HELM_RELEASE": "prod",
        "NVFP4_K8S_NAMESPACE": "nvfp4",
    }
    # 3 > NVFP4_COMPOSE_MAX_WORKERS (1): that limit is for one compose node, not a cluster.
    out = CliRunner().invoke(cli, ["workers", "scale", "3"], env=env)
    assert out.exit_code == 0, out.output
    assert "deployment nvfp4/prod-nvfp4-stack-worker: 1 -> 3 worker(s)" in out.output
    assert fake_kubernetes.patches == [{"spec": {"replicas": 3}}]
    out = CliRunner().invoke(cli, ["workers", "scale", "0", "--deployment", "missing"], env=env)
    assert out.exit_code == 1
    assert "refused to scale deployment nvfp4/missing: 404" in out.output


@pytest.mark.parametrize("release", ["nvfp4", "nvfp4-stack-prod", "team-a"])
def test_deployment_name_matches_the_chart(release: str) -> None:
    if not HELM.exists():
        pytest.skip("helm is not installed (helm/install-tools.sh)")
    rendered = subprocess.run(
        [str(HELM), "template", release, str(ROOT / "helm" / "nvfp4-stack")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    names = re.findall(r"kind: Deployment\nmetadata:\n  name: (\S+)", rendered)
    assert worker_deployment_name(release) in names
