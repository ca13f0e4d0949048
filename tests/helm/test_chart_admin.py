"""The admin toolbox: `nvfp4ctl` in the pod can scale the workers and read Ray's dashboard.

There is no Kubernetes cluster and no Ray here, so the real CLI runs with the admin pod's
rendered environment against a small local server that answers the two endpoints it calls:
the apps/v1 Deployment scale subresource (checked against the rendered Role, the way the
API server's RBAC would) and Ray's /api/serve/applications/ (which demands the token).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nvfp4_admin.cli import cli

from .chart import FULLNAME, Chart, Manifests

ADMIN = f"{FULLNAME}-admin"
WORKER = f"{FULLNAME}-worker"
NAMESPACE = "ml"  # the namespace chart.py renders into
HTTP_VERBS = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}
RESOURCE_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/v1/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)"
    r"/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?$"
)


def admin_pod(docs: Manifests, name: str = ADMIN) -> dict[str, Any]:
    return docs.get("Deployment", name)["spec"]["template"]["spec"]


def admin_env(docs: Manifests) -> list[dict[str, Any]]:
    (container,) = admin_pod(docs)["containers"]
    return container["env"]


def secret_value(docs: Manifests, name: str, key: str) -> str:
    return base64.b64decode(docs.get("Secret", name)["data"][key]).decode()


def pod_environment(docs: Manifests, name: str = ADMIN) -> dict[str, str]:
    """What the kubelet would give the admin container: the ConfigMap, then `env` in order,
    with $(VAR) references expanded and secretKeyRefs read from the rendered Secret."""
    (container,) = admin_pod(docs, name)["containers"]
    (source,) = container["envFrom"]
    env = dict(docs.get("ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"]
            )
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            if ref["key"] in docs.get("Secret", ref["name"])["data"]:
                env[var["name"]] = secret_value(docs, ref["name"], ref["key"])
            else:
                assert ref.get("optional"), f"{var['name']}: no key {ref['key']}"
    return env


def allowed_by(role: dict[str, Any], method: str, path: str) -> bool:
    """RBAC's decision for one request to a namespaced resource, from a Role's rules."""
    m = RESOURCE_PATH.match(path)
    if m is None or m["ns"] != NAMESPACE:
        return False
    resource = f"{m['resource']}/{m['sub']}" if m["sub"] else m["resource"]
    return any(
        m["group"] in rule["apiGroups"]
        and resource in rule["resources"]
        and HTTP_VERBS[method] in rule["verbs"]
        and (not rule.get("resourceNames") or m["name"] in rule["resourceNames"])
        for rule in role["rules"]
    )


class FakeApis:
    """The Kubernetes API (one Deployment's scale, authorized by `role`) and Ray's dashboard."""

    def __init__(self, role: dict[str, Any], deployment: str, ray_token: str | None) -> None:
        self.role = role
        self.deployment = deployment
        self.ray_token = ray_token
        self.replicas = 1
        self.requests: list[tuple[str, str]] = []

    def route(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        self.requests.append((method, path))
        if path.startswith("/api/serve/"):
            if headers.get("Authorization") != f"Bearer {self.ray_token}":
                return 401, {"error": "Unauthorized"}
            return 200, {"applications": {}, "proxies": {}}
        if not allowed_by(self.role, method, path):
            return 403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403}
        if not path.endswith(f"/deployments/{self.deployment}/scale"):
            return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}
        if method == "PATCH":
            self.replicas = body["spec"]["replicas"]
        return 200, {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {"name": self.deployment, "namespace": NAMESPACE},
            "spec": {"replicas": self.replicas},
            "status": {"replicas": self.replicas},
        }


@pytest.fixture
def serve_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start a FakeApis on a free port; the kubernetes client finds it through KUBECONFIG."""
    servers: list[ThreadingHTTPServer] = []

    def start(fake: FakeApis) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, payload = fake.route(self.command, self.path, self.headers, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": url}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        return url

    # In the pod the client reads the mounted ServiceAccount token; here, the kubeconfig.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    # The client reads KUBECONFIG once, when it is first imported: another test may have.
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig")
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_grants_the_admin_pod_patch_on_the_worker_deployments_scale_only(
    chart: Chart, serve_fake: Any
) -> None:
    # fullnameOverride: the CLI's own default name (from NVFP4_HELM_RELEASE) would miss the
    # Deployment, so this also checks that the chart tells the CLI the real name.
    docs = chart.render({"admin": {"enabled": True}, "fullnameOverride": "llm"})
    worker, admin = "llm-worker", "llm-admin"
    assert docs.get("Deployment", worker)
    pod = admin_pod(docs, admin)
    role = docs.get("Role", admin)
    binding = docs.get("RoleBinding", admin)

    # The pod runs as the bound account, with its token mounted.
    assert pod["serviceAccountName"] == admin
    assert pod["automountServiceAccountToken"] is True
    assert docs.get("ServiceAccount", admin)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": admin,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": admin, "namespace": NAMESPACE}
    ]

    # Nothing but the worker Deployment, and no write other than its scale.
    assert all(rule["resourceNames"] == [worker] for rule in role["rules"])
    writes = {
        (resource, verb)
        for rule in role["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        if verb not in ("get",)
    }
    assert writes == {("deployments/scale", "patch")}

    # The real CLI with the pod's environment scales the worker, within those rules.
    fake = FakeApis(role, worker, ray_token=None)
    serve_fake(fake)
    out = CliRunner().invoke(cli, ["workers", "scale", "3"], env=pod_environment(docs, admin))
    assert out.exit_code == 0, out.output
    assert f"deployment {NAMESPACE}/{worker}: 1 -> 3 worker(s)" in out.output
    assert fake.replicas == 3
    assert [m for m, _ in fake.requests] == ["GET", "PATCH"]
    assert all(allowed_by(role, m, p) for m, p in fake.requests)


def test_no_rbac_when_admin_rbac_create_is_false(chart: Chart) -> None:
    docs = chart.render({"admin": {"enabled": True, "rbac": {"create": False}}})
    assert not docs.has("Role") and not docs.has("RoleBinding")
    assert [sa["metadata"]["name"] for sa in docs.all("ServiceAccount")] == [FULLNAME]
    pod = admin_pod(docs)
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["automountServiceAccountToken"] is False


def test_no_rbac_without_the_admin_pod(default: Manifests) -> None:
    assert not default.has("Role") and not default.has("RoleBinding")
    assert not any(d["metadata"]["name"] == ADMIN for d in default)


def test_gives_the_admin_pod_the_rayservice_token(chart: Chart, serve_fake: Any) -> None:
    docs = chart.render({"admin": {"enabled": True}})
    auth = docs.get("RayService")["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": FULLNAME}
    (token_var,) = [e for e in admin_env(docs) if e["name"] == "NVFP4_RAY_AUTH_TOKEN"]
    # KubeRay reads the key auth_token of authOptions.secretName: the same Secret and key.
    assert token_var["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": "auth_token"}
    token = secret_value(docs, FULLNAME, "auth_token")
    assert len(token) == 40

    # The CLI sends it: `nvfp4ctl serve status` gets past a dashboard that demands it.
    url = serve_fake(FakeApis(docs.get("Role", ADMIN), WORKER, ray_token=token))
    env = pod_environment(docs)
    out = CliRunner().invoke(cli, ["--ray-address", url, "serve", "status"], env=env)
    assert out.exit_code == 0, out.output
    assert "no Serve applications" in out.output
    out = CliRunner().invoke(
        cli, ["--ray-address", url, "serve", "status"], env={**env, "NVFP4_RAY_AUTH_TOKEN": None}
    )
    assert out.exit_code == 1
    assert "401" in out.output


def test_takes_the_ray_token_from_values_or_an_existing_secret(chart: Chart) -> None:
    docs = chart.render({"secrets": {"rayAuthToken": "ray-token-0123456789"}})
    assert secret_value(docs, FULLNAME, "auth_token") == "ray-token-0123456789"
    docs = chart.render({"admin": {"enabled": True}, "secrets": {"existingSecret": "vault"}})
    auth = docs.get("RayService")["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["secretName"] == "vault"
    (token_var,) = [e for e in admin_env(docs) if e["name"] == "NVFP4_RAY_AUTH_TOKEN"]
    assert token_var["valueFrom"]["secretKeyRef"] == {"name": "vault", "key": "auth_token"}


def test_no_ray_token_when_ray_auth_is_off(chart: Chart) -> None:
    docs = chart.render({"admin": {"enabled": True}, "ray": {"authEnabled": False}})
    assert docs.get("RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    assert "auth_token" not in docs.get("Secret", FULLNAME)["data"]
    assert all(e["name"] != "NVFP4_RAY_AUTH_TOKEN" for e in admin_env(docs))
