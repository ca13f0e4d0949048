"""`nvfp4ctl serve`: config building, the zero-downtime rollout and the REST client.

Ray's dashboard runs in the serving environment (.venv-serve, a Ray cluster); these unit
tests stand in for it with a small local HTTP server that imitates its REST API: the
shapes of GET/PUT /api/serve/applications/ and /api/v0/logs/file as Ray 2.60 serves them,
and the Serve proxy's routing by longest route prefix. It models the Ray behaviour the
rollout depends on (read from Ray's sources, then seen on a real Ray 2.60 cluster serving
nvfp4_serve with vLLM CPU): a PUT replaces the whole set of apps; an app whose
import_path/runtime_env/args are unchanged keeps its replicas even when its route_prefix
changes (a reconfigure); a changed app restarts and is not ready while it loads; a changed
deployment override restarts the engine too (Ray re-derives its actor options), unless it
asks for a surge (max_surge_percent), when the old replicas serve until the new are up.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner

from nvfp4_admin import serve_config as sc
from nvfp4_admin.cli import cli
from nvfp4_admin.ray_client import RayApiError, RayClient
from nvfp4_admin.rollout import Rollout, RolloutError, RolloutOptions
from nvfp4_common.jobs import JobResult, JobSpec
from nvfp4_common.queue import JobQueue
from nvfp4_common.serve_history import ServeHistory


class FakeRay:
    """State of the imitated Ray cluster: apps, their readiness, and the PUTs received."""

    def __init__(self, load_s: float = 0.3) -> None:
        self.load_s = load_s
        self.apps: dict[str, dict[str, Any]] = {}
        self.puts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        # Replicas Ray has not placed yet (no actor, no log file), added to each deployment.
        self.pending_replicas = 0
        # Log files whose name contains one of these are not found (not written yet).
        self.unreadable_logs: set[str] = set()

    @staticmethod
    def code_version(cfg: dict[str, Any]) -> str:
        keys = {k: cfg.get(k) for k in ("import_path", "runtime_env", "args")}
        return hashlib.md5(json.dumps(keys, sort_keys=True).encode()).hexdigest()

    def put(self, body: dict[str, Any]) -> tuple[int, str]:
        names = [a["name"] for a in body.get("applications", [])]
        routes = [a.get("route_prefix", "/") for a in body.get("applications", [])]
        if len(set(names)) != len(names) or len(set(routes)) != len(routes):
            return 400, "duplicate application names or route prefixes"
        with self.lock:
            self.puts.append(body)
            now = time.monotonic()
            new_apps = {}
            for cfg in body["applications"]:
                old = self.apps.get(cfg["name"])
                if old and old["version"] == self.code_version(cfg):
                    new_apps[cfg["name"]] = {**old, "cfg": cfg}  # reconfigure only
                    changed = [
                        d
                        for d in cfg.get("deployments", [])
                        if d not in old["cfg"].get("deployments", [])
                    ]
                    if any(not d.get("max_surge_percent") for d in changed):
                        new_apps[cfg["name"]]["ready_at"] = now + self.load_s  # restarted
                else:
                    broken = "broken" in str(cfg.get("args", {}).get(sc.MODEL_ARG, ""))
                    new_apps[cfg["name"]] = {
                        "cfg": cfg,
                        "version": self.code_version(cfg),
                        "ready_at": now + self.load_s,
                        "broken": broken,
                        "deployed_at": time.time(),
                    }
            self.apps = new_apps
        return 200, ""

    def status(self, app: dict[str, Any]) -> str:
        if time.monotonic() < app["ready_at"]:
            return "DEPLOYING"
        return "DEPLOY_FAILED" if app["broken"] else "RUNNING"

    def details(self) -> dict[str, Any]:
        with self.lock:
            apps = {}
            for name, a in self.apps.items():
                status = self.status(a)
                replica_state = "RUNNING" if status == "RUNNING" else "STARTING"
                deployments = {
                    dep: {
                        "status": "HEALTHY" if status == "RUNNING" else "UPDATING",
                        "status_trigger": "CONFIG_UPDATE_COMPLETED",
                        "message": "",
                        "deployment_config": {"name": dep},
                        "target_num_replicas": 1,
                        "required_resources": {"CPU": 1},
                        "replicas": [
                            {
                                "node_id": "node1",
                                "node_ip": "127.0.0.1",
                                "actor_id": f"actor-{name}-{dep}",
                                "replica_id": f"{dep}-r1",
                                "state": replica_state,
                                "pid": 4242,
                                "start_time_s": a["deployed_at"],
                                "log_file_path": f"/serve/replica_{name}_{dep}.log",
                            }
                        ]
                        + [
                            # As Ray 2.60 lists a replica waiting for resources.
                            {"replica_id": f"{dep}-p{i}", "state": "PENDING_ALLOCATION"}
                            for i in range(self.pending_replicas)
                        ],
                    }
                    # Ray Serve LLM names the engine deployment after the model id.
                    for dep in ("OpenAiIngress", f"LLMServer:{sc.served_name(a['cfg'])}")
                }
                apps[name] = {
                    "name": name,
                    "route_prefix": a["cfg"].get("route_prefix", "/"),
                    "docs_path": None,
                    "status": status,
                    "message": "replica crashed: out of memory"
                    if status == "DEPLOY_FAILED"
                    else "",
                    "last_deployed_time_s": a["deployed_at"],
                    "deployed_app_config": a["cfg"],
                    "source": "declarative",
                    "deployments": deployments,
                }
            return {
                "controller_info": {"node_id": "node1"},
                "proxy_location": "EveryNode",
                "http_options": {"host": "0.0.0.0", "port": 8000},
                "proxies": {"node1": {"status": "HEALTHY"}},
                "applications": apps,
                "target_capacity": None,
            }

    def route(self, path: str) -> tuple[int, str]:
        """The proxy: longest route prefix wins; ready apps answer 200."""
        with self.lock:
            best, best_len = None, -1
            for a in self.apps.values():
                prefix = a["cfg"].get("route_prefix", "/")
                if (path == prefix or path.startswith(prefix.rstrip("/") + "/")) and len(
                    prefix
                ) > best_len:
                    best, best_len = a, len(prefix)
            if best is None:
                return 404, "Path not found"
            return (200, "ready") if self.status(best) == "RUNNING" else (503, "not ready")


def _handler(fake: FakeRay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, text: str, ctype: str = "text/plain") -> None:
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/api/serve/applications/":
                self._send(200, json.dumps(fake.details()), "application/json")
            elif url.path == "/api/ray/version":
                self._send(
                    200, json.dumps({"version": "4", "ray_version": "2.60.0"}), "application/json"
                )
            elif url.path == "/api/v0/logs/file":
                if q.get("filename", "").startswith("/"):
                    # Ray resolves '/x' as an absolute path outside its log folder.
                    self._send(500, f"A file is not found at: {q['filename']}")
                elif any(part in q.get("filename", "") for part in fake.unreadable_logs):
                    self._send(404, f"A file is not found at: {q['filename']}")
                elif "filename" in q:
                    self._send(200, f"{q['filename']} last {q.get('lines')} lines\n")
                else:
                    self._send(200, f"{q.get('actor_id')} {q.get('suffix')}\n")
            else:
                code, body = fake.route(url.path)
                self._send(code, body)

        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            code, text = fake.put(body)
            self._send(code, text)

    return Handler


@pytest.fixture
def fake_ray() -> Iterator[tuple[FakeRay, str]]:
    fake = FakeRay()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _live_config(fake: FakeRay, model: str = "/models/old") -> None:
    fake.load_s, saved = 0.0, fake.load_s
    fake.put(
        {
            "applications": [
                {
                    "name": "nvfp4",
                    "route_prefix": "/",
                    "import_path": "nvfp4_serve.app:build_app",
                    "args": {sc.MODEL_ARG: model, sc.SERVED_NAME_ARG: "old", "max_model_len": 4096},
                }
            ]
        }
    )
    fake.load_s = saved


class Prober:
    """Polls the main route the whole time, like a client would."""

    def __init__(self, fake: FakeRay) -> None:
        self.fake = fake
        self.codes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.codes.append(self.fake.route("/readyz")[0])
            time.sleep(0.005)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _rollout(url: str) -> Rollout:
    ray = RayClient(url, url)
    return Rollout(ray, RolloutOptions(timeout_s=10, poll_s=0.02), say=lambda m: None)


# --- pure config building -------------------------------------------------------------


def test_app_config_keeps_template_and_swaps_model() -> None:
    template = {
        "name": "nvfp4",
        "route_prefix": "/",
        "import_path": "nvfp4_serve.app:build_app",
        "runtime_env": {"env_vars": {"A": "1"}},
        "args": {sc.MODEL_ARG: "/models/a", sc.SERVED_NAME_ARG: "a", "max_model_len": 4096},
        "deployments": [{"name": "NVFP4Ingress", "max_ongoing_requests": 64}],
    }
    cfg = sc.app_config(
        "nvfp4-x", "/", "/models/b", "ignored:path", template, {"enforce_eager": True}
    )
    assert cfg["name"] == "nvfp4-x"
    assert cfg["import_path"] == "nvfp4_serve.app:build_app"
    assert cfg["runtime_env"] == {"env_vars": {"A": "1"}}
    assert cfg["deployments"] == [{"name": "NVFP4Ingress", "max_ongoing_requests": 64}]
    assert cfg["args"] == {sc.MODEL_ARG: "/models/b", "max_model_len": 4096, "enforce_eager": True}
    assert template["args"][sc.MODEL_ARG] == "/models/a"  # the template is not modified
    fresh = sc.app_config("n", "/", "/models/c", "nvfp4_serve.app:build_app")
    assert fresh == {
        "import_path": "nvfp4_serve.app:build_app",
        "name": "n",
        "route_prefix": "/",
        "args": {sc.MODEL_ARG: "/models/c"},
    }


def test_a_new_app_answers_to_the_ids_of_the_apps_it_replaces() -> None:
    new = {"name": "n", "args": {sc.MODEL_ARG: "/models/b/", sc.ALIASES_ARG: ["stale"]}}
    replaced = [
        {"name": "a", "args": {sc.MODEL_ARG: "/models/a"}},
        {"name": "c", "args": {sc.MODEL_ARG: "/models/c", sc.SERVED_NAME_ARG: "chat"}},
        {"name": "same", "args": {sc.MODEL_ARG: "/other/b"}},  # its id is the new app's own
    ]
    out = sc.with_aliases(new, [sc.served_name(a) or "" for a in replaced] + ["a"])
    assert out["args"] == {sc.MODEL_ARG: "/models/b/", sc.ALIASES_ARG: ["a", "chat"]}
    assert new["args"][sc.ALIASES_ARG] == ["stale"]  # the input is not modified
    assert sc.served_name(out) == "b"


def test_the_id_of_an_app_named_by_its_settings_comes_from_its_engine_deployment() -> None:
    # compose serves NVFP4_SERVE_MODEL: the builder args name no model, Ray's status does.
    details = {
        "applications": {
            "nvfp4": {
                "deployed_app_config": {"name": "nvfp4", "args": {}},
                "deployments": {"NVFP4Ingress": {}, "LLMServer:tiny-qwen3": {}},
            }
        }
    }
    assert sc.served_name(details["applications"]["nvfp4"]["deployed_app_config"]) is None
    assert sc.live_model_ids(details, "nvfp4") == ["tiny-qwen3"]
    assert sc.live_model_ids(details, "gone") == []


def test_engine_overrides_become_builder_args_when_the_model_changes() -> None:
    # After `serve scale`, the live app overrides its engine deployment, which Ray Serve LLM
    # names after the model: the new app has no such deployment.
    template = {
        "name": "nvfp4",
        "import_path": "nvfp4_serve.app:build_app",
        "args": {sc.MODEL_ARG: "/models/a"},
        "deployments": [
            {"name": "LLMServer:a", "num_replicas": 2, "max_surge_percent": 100},
            {"name": "NVFP4Ingress", "max_ongoing_requests": 64},
        ],
    }
    cfg = sc.app_config("n", "/", "/models/b", "x", template)
    assert cfg["deployments"] == [{"name": "NVFP4Ingress", "max_ongoing_requests": 64}]
    assert cfg["args"] == {sc.MODEL_ARG: "/models/b", "num_replicas": 2}
    auto = {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 5}
    template["deployments"][0] = {"name": "LLMServer:a", "autoscaling_config": auto}
    cfg = sc.app_config("n", "/", "/models/b", "x", template)
    assert cfg["args"][sc.AUTOSCALING_ARG] == {"min_replicas": 1, "max_replicas": 3}
    same = sc.app_config("n", "/", "/models/a", "x", template)  # same model: kept as is
    assert same["deployments"] == template["deployments"]


def test_current_body_refuses_apps_deployed_from_python() -> None:
    details = {
        "applications": {
            "x": {"route_prefix": "/", "status": "RUNNING", "deployed_app_config": None}
        }
    }
    with pytest.raises(sc.ServeConfigError, match="serve.run"):
        sc.current_body(details)


def test_current_body_leaves_out_an_app_being_deleted() -> None:
    """A replaced application drains for a while after a switch (Ray has dropped its
    config by then): a scale or rollback in that time must neither fail nor revive it."""
    live = {"name": "new", "route_prefix": "/", "import_path": "nvfp4_serve.app:build_app"}
    details = {
        "applications": {
            "old": {"route_prefix": "/", "status": "DELETING", "deployed_app_config": None},
            "new": {"route_prefix": "/", "status": "RUNNING", "deployed_app_config": live},
        }
    }
    assert sc.current_body(details)["applications"] == [live]


def test_replace_apps_refuses_shared_routes() -> None:
    body = {"applications": [{"name": "a", "route_prefix": "/"}]}
    with pytest.raises(sc.ServeConfigError, match="share the route"):
        sc.replace_apps(body, remove=[], add=[{"name": "b", "route_prefix": "/"}])
    assert sc.replace_apps(body, remove=["a"], add=[{"name": "b", "route_prefix": "/"}])[
        "applications"
    ] == [{"name": "b", "route_prefix": "/"}]


def test_scaled_app_switches_between_fixed_and_autoscaling() -> None:
    app = {"name": "a", "deployments": [{"name": "D", "num_replicas": 1}]}
    auto = sc.scaled_app(app, "D", min_replicas=1, max_replicas=4)
    (dep,) = auto["deployments"]
    assert dep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    assert "num_replicas" not in dep and dep["max_surge_percent"] == 100
    (dep,) = sc.scaled_app(auto, "D", replicas=3)["deployments"]
    assert dep == {"name": "D", "num_replicas": 3, "max_surge_percent": 100}
    with pytest.raises(sc.ServeConfigError, match="min"):
        sc.scaled_app(app, "D", min_replicas=5, max_replicas=2)


def test_parse_args_takes_json_values() -> None:
    assert sc.parse_args(["a=1", "b=true", "c=text", 'd={"x": 2}']) == {
        "a": 1,
        "b": True,
        "c": "text",
        "d": {"x": 2},
    }
    with pytest.raises(sc.ServeConfigError):
        sc.parse_args(["novalue"])


# --- the rollout against the imitated dashboard ----------------------------------------


def test_blue_green_keeps_the_main_route_ready_throughout(fake_ray: tuple[FakeRay, str]) -> None:
    fake, url = fake_ray
    _live_config(fake)
    saved: list[dict[str, Any]] = []
    new = sc.app_config(
        "nvfp4-new",
        "/",
        "/models/new",
        "nvfp4_serve.app:build_app",
        template=fake.details()["applications"]["nvfp4"]["deployed_app_config"],
    )
    with Prober(fake) as prober:
        _rollout(url).blue_green(new, on_switched=saved.append)
        time.sleep(0.05)
    assert prober.codes and set(prober.codes) == {200}, "the main route was not ready at some point"
    # The new model was staged next to the old one, then moved onto the main route.
    stage, switch = fake.puts[1], fake.puts[2]
    assert {a["name"]: a["route_prefix"] for a in stage["applications"]} == {
        "nvfp4": "/",
        "nvfp4-new": "/_staging/nvfp4-new",
    }
    assert {a["name"]: a["route_prefix"] for a in switch["applications"]} == {"nvfp4-new": "/"}
    # The live app went back exactly as Ray reported it: any edit could restart it.
    assert (
        next(a for a in stage["applications"] if a["name"] == "nvfp4")
        == (fake.puts[0]["applications"][0])
    )
    assert stage["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert saved == [
        fake.puts[0]
        | {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": 8000}}
    ]
    assert (
        fake.details()["applications"]["nvfp4-new"]["deployed_app_config"]["args"][sc.MODEL_ARG]
        == "/models/new"
    )


def test_replace_has_downtime_that_blue_green_avoids(fake_ray: tuple[FakeRay, str]) -> None:
    fake, url = fake_ray
    _live_config(fake)
    new = sc.app_config("nvfp4-new", "/", "/models/new", "nvfp4_serve.app:build_app")
    rollout = _rollout(url)
    with Prober(fake) as prober:
        rollout.replace(new, on_switched=lambda b: None)
    assert 503 in prober.codes  # the prober can see downtime: the blue-green test is meaningful
    assert list(fake.details()["applications"]) == ["nvfp4"]


def test_failed_new_model_is_removed_and_old_keeps_serving(fake_ray: tuple[FakeRay, str]) -> None:
    fake, url = fake_ray
    _live_config(fake)
    new = sc.app_config("nvfp4-bad", "/", "/models/broken", "nvfp4_serve.app:build_app")
    saved: list[Any] = []
    with Prober(fake) as prober, pytest.raises(RolloutError, match="DEPLOY_FAILED.*out of memory"):
        _rollout(url).blue_green(new, on_switched=saved.append)
    assert set(prober.codes) == {200}
    assert list(fake.details()["applications"]) == ["nvfp4"]
    assert fake.puts[-1]["applications"] == fake.puts[0]["applications"]  # restored as it was
    assert saved == []


# --- the CLI commands ------------------------------------------------------------------


def _invoke(url: str, redis_url: str, *args: str) -> Any:
    env = {"NVFP4_RAY_ADDRESS": url, "NVFP4_SERVE_URL": url, "NVFP4_REDIS_URL": redis_url}
    return CliRunner().invoke(cli, list(args), env=env)


def test_status_table_and_json(fake_ray: tuple[FakeRay, str], redis_url: str) -> None:
    fake, url = fake_ray
    _live_config(fake)
    out = _invoke(url, redis_url, "serve", "status")
    assert out.exit_code == 0, out.output
    assert "nvfp4" in out.output and "/models/old" in out.output and "2/2" in out.output
    data = json.loads(_invoke(url, redis_url, "serve", "status", "--json").output)
    assert data["applications"][0]["status"] == "RUNNING"
    assert data["proxies"] == {"node1": "HEALTHY"}


def test_deploy_then_rollback_through_the_cli(
    fake_ray: tuple[FakeRay, str], redis_url: str
) -> None:
    fake, url = fake_ray
    fake.load_s = 0.0  # the CLI polls every 2 s; ready at once keeps the test fast
    _live_config(fake)
    out = _invoke(
        url, redis_url, "serve", "deploy", "--model", "/models/new", "--arg", "enforce_eager=true"
    )
    assert out.exit_code == 0, out.output
    apps = fake.details()["applications"]
    (name,) = apps
    assert name.startswith("nvfp4-") and apps[name]["route_prefix"] == "/"
    assert apps[name]["deployed_app_config"]["args"] == {
        sc.MODEL_ARG: "/models/new",
        "max_model_len": 4096,
        "enforce_eager": True,
        sc.ALIASES_ARG: ["old"],  # clients holding the old id keep getting answers
    }
    out = _invoke(url, redis_url, "serve", "rollback")
    assert out.exit_code == 0, out.output
    (back,) = fake.details()["applications"].values()
    assert back["deployed_app_config"]["args"][sc.MODEL_ARG] == "/models/old"
    assert back["deployed_app_config"]["args"][sc.ALIASES_ARG] == ["new"]
    assert back["route_prefix"] == "/"
    again = _invoke(url, redis_url, "serve", "rollback")
    assert again.exit_code == 1 and "nothing to roll back" in again.output


def test_deploy_needs_exactly_one_source(fake_ray: tuple[FakeRay, str], redis_url: str) -> None:
    _, url = fake_ray
    out = _invoke(url, redis_url, "serve", "deploy")
    assert out.exit_code == 2 and "exactly one" in out.output
    out = _invoke(url, redis_url, "serve", "deploy", "--job", "nope")
    assert out.exit_code == 1 and "no job 'nope'" in out.output


def test_scale_sets_replicas_on_the_engine_deployment(
    fake_ray: tuple[FakeRay, str], redis_url: str
) -> None:
    fake, url = fake_ray
    _live_config(fake)
    with Prober(fake) as prober:
        out = _invoke(url, redis_url, "serve", "scale", "--replicas", "3")
        time.sleep(fake.load_s + 0.1)  # long enough to see a restart if there were one
    assert out.exit_code == 0, out.output
    assert set(prober.codes) == {200}
    surge = {"max_surge_percent": sc.SURGE_PERCENT}
    assert fake.puts[-1]["applications"][0]["deployments"] == [
        {"name": "LLMServer:old", "num_replicas": 3, **surge}
    ]
    out = _invoke(url, redis_url, "serve", "scale", "--min", "1", "--max", "4")
    assert fake.puts[-1]["applications"][0]["deployments"] == [
        {
            "name": "LLMServer:old",
            **surge,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
        }
    ]
    bad = _invoke(url, redis_url, "serve", "scale", "--replicas", "2", "--max", "3")
    assert bad.exit_code == 2


def test_logs_strip_the_leading_slash(fake_ray: tuple[FakeRay, str], redis_url: str) -> None:
    fake, url = fake_ray
    _live_config(fake)
    out = _invoke(url, redis_url, "serve", "logs", "-n", "5")
    assert out.exit_code == 0, out.output
    assert "serve/replica_nvfp4_LLMServer:old.log last 5 lines" in out.output
    out = _invoke(url, redis_url, "serve", "logs", "--kind", "err")
    assert "actor-nvfp4-OpenAiIngress err" in out.output


def test_logs_list_a_replica_without_a_log_and_go_on(
    fake_ray: tuple[FakeRay, str], redis_url: str
) -> None:
    fake, url = fake_ray
    _live_config(fake)
    fake.pending_replicas = 1
    out = _invoke(url, redis_url, "serve", "logs", "-n", "5")
    assert out.exit_code == 0, out.output
    assert out.output.count("(no log yet: the replica is PENDING_ALLOCATION)") == 2
    assert "serve/replica_nvfp4_LLMServer:old.log last 5 lines" in out.output

    # A log Ray cannot read yet (a replica that has just started) is said, and the rest
    # printed; when no log can be read, the command fails with Ray's reason in one line.
    fake.unreadable_logs = {"replica_nvfp4_OpenAiIngress"}
    out = _invoke(url, redis_url, "serve", "logs", "-n", "5")
    assert out.exit_code == 0, out.output
    assert "(log not readable: " in out.output and "HTTP 404" in out.output
    assert "serve/replica_nvfp4_LLMServer:old.log last 5 lines" in out.output
    fake.unreadable_logs = {"replica_nvfp4_"}
    out = _invoke(url, redis_url, "serve", "logs", "-n", "5")
    assert out.exit_code == 1
    assert out.output.strip().splitlines()[-1].startswith("Error: Ray's dashboard at ")


def test_unreachable_dashboard_is_one_line(redis_url: str) -> None:
    out = _invoke("http://127.0.0.1:9", redis_url, "serve", "status")
    assert out.exit_code == 1
    assert out.output.startswith("Error: cannot reach http://127.0.0.1:9/api/serve/applications/")
    assert "Traceback" not in out.output and out.output.count("\n") == 1


def test_ray_address_option_wins_over_the_environment(
    fake_ray: tuple[FakeRay, str], redis_url: str
) -> None:
    fake, url = fake_ray
    _live_config(fake)
    dead = "http://127.0.0.1:9"
    out = _invoke(dead, redis_url, "--ray-address", url, "serve", "status")
    assert out.exit_code == 0, out.output
    assert "/models/old" in out.output
    out = _invoke(url, redis_url, "--ray-address", dead, "serve", "status")
    assert out.exit_code == 1
    assert out.output.startswith(f"Error: cannot reach {dead}/api/serve/applications/")


def test_client_reports_http_errors_with_the_body(fake_ray: tuple[FakeRay, str]) -> None:
    _, url = fake_ray
    client = RayClient(url, url)
    with pytest.raises(RayApiError, match="HTTP 400.*duplicate"):
        client.deploy(
            {
                "applications": [
                    {"name": "a", "route_prefix": "/"},
                    {"name": "a", "route_prefix": "/b"},
                ]
            }
        )
    assert client.version()["ray_version"] == "2.60.0"
    assert client.probe("/nothing")[0] == 404


def test_deploy_a_job_output(
    fake_ray: tuple[FakeRay, str], redis_url: str, queue: JobQueue
) -> None:
    fake, url = fake_ray
    fake.load_s = 0.0
    _live_config(fake)
    job = queue.submit(JobSpec(model="/models/base"))
    out = _invoke(url, redis_url, "serve", "deploy", "--job", job.id)
    assert out.exit_code == 1 and f"job {job.id} is queued" in out.output
    claimed = queue.claim("w")
    assert claimed is not None
    result = JobResult(
        output_name="base-NVFP4",
        output_path="/data/models/base-NVFP4",
        source_bytes=10,
        output_bytes=4,
        duration_s=1.0,
    )
    queue.succeed(claimed, "w", result)
    out = _invoke(url, redis_url, "serve", "deploy", "--job", job.id, "--served-model-name", "prod")
    assert out.exit_code == 0, out.output
    (app,) = fake.details()["applications"].values()
    args = app["deployed_app_config"]["args"]
    assert args[sc.MODEL_ARG] == "/data/models/base-NVFP4" and args[sc.SERVED_NAME_ARG] == "prod"
    assert [
        c["applications"][0]["args"][sc.MODEL_ARG] for c in ServeHistory(queue.redis).configs()
    ] == ["/models/old"]
