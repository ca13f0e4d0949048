"""Start and stop a private Ray cluster serving `nvfp4_serve.app:build_app`.

The cluster runs from .venv-serve (vLLM CPU + Ray) as a subprocess of the test, on
free ports (GCS never on 6379, which Redis uses) and its own temp dir. It is stopped
by killing exactly the processes it started: its process group, then any process
that carries its unique marker variable (Ray workers and vLLM engine processes may
leave the group). `ray stop` is never used: it would stop every Ray on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nvfp4_common.serving import RAY_ENV_DEFAULTS

from .processes import kill_marked

ROOT = Path(__file__).resolve().parents[2]
SERVE_VENV = ROOT / ".venv-serve"
SERVE_PYTHON = SERVE_VENV / "bin" / "python"
MARKER = "NVFP4_TEST_CLUSTER_ID"


def serve_env_available() -> bool:
    return SERVE_PYTHON.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_maxconn() -> int:
    """The most connections HAProxy can hold within this process's open-file limit.

    HAProxy 2.8 needs about 2.5 descriptors a connection plus 36, a few more for each
    backend server, and exits at start when it cannot raise its limit that far ("Cannot
    raise FD limit"). Ray 2.58 asks for maxconn 20000 (50,036 descriptors), more than many
    containers' hard limit; Ray 2.60 asks for 4096. 5% of the limit is left for the
    servers: with none left, a reload that added a second application's replica (a
    blue-green deploy) asked for 20,001 of 20,000 and failed."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    room = 20000 if hard == resource.RLIM_INFINITY else int((hard * 0.95 - 36) / 2.5)
    return max(256, min(20000, room))


@dataclass
class ServeCluster:
    """One Ray head node plus one Serve application; see `start` and `stop`."""

    app_args: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    num_cpus: int = 4
    app_name: str = "llm"
    # The application's builder; another one (bench/devkit/direct_streaming.py) is
    # imported from bench/, which the cluster's processes get on their PYTHONPATH.
    import_path: str = "nvfp4_serve.app:build_app"
    # Serve config overrides of the app's deployments (e.g. an engine's num_replicas).
    deployments: list[dict[str, Any]] = field(default_factory=list)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    ports: dict[str, int] = field(default_factory=dict)
    temp_dir: Path | None = None
    # (status, body) of every /readyz answer while waiting: shows the not-ready phase.
    probe_history: list[tuple[int, str]] = field(default_factory=list)
    _head: subprocess.Popen[bytes] | None = None
    _log: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "NVFP4_"))}
        env.update(
            {
                MARKER: self.marker,
                "RAY_AUTH_MODE": "disabled",  # Ray 2.60 token auth would refuse our CLI calls
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "VLLM_HOST_IP": "127.0.0.1",  # keep vLLM and Ray on loopback
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # Serve's mode of every deployment of ours (throughput-optimized); a test's
                # or a benchmark variant's `env` may still override it.
                **RAY_ENV_DEFAULTS,
            }
        )
        if self.temp_dir is not None:
            # HAProxy (when RAY_SERVE_ENABLE_HA_PROXY=1) defaults to fixed ports and
            # /tmp/haproxy-serve: give each cluster its own, like every other Ray port.
            haproxy = self.temp_dir / "haproxy"
            env.update(
                {
                    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
                    "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(self.ports["haproxy_metrics"]),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(self.ports["haproxy_stats"]),
                    "RAY_SERVE_HAPROXY_MAXCONN": str(haproxy_maxconn()),
                }
            )
        if not self.import_path.startswith("nvfp4_serve."):
            bench = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [bench, env.get("PYTHONPATH")]))
        env.update(self.env)
        return env

    def _ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SERVE_VENV / "bin" / args[0]), *args[1:]],
            env=self.child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout_s: float = 300) -> ServeCluster:
        """Start Ray, deploy the app, and wait until /readyz says ready."""
        # On an overloaded host `ray start` itself can time out ("GCS has become
        # overloaded"); one fresh try on new ports gets past that.
        for attempt in (1, 2):
            try:
                self._start_head()
                break
            except (RuntimeError, TimeoutError):
                self.stop()
                if attempt == 2:
                    raise
        try:
            self.deploy(self.app_args)
            self.wait_ready(deadline=time.monotonic() + timeout_s)
        except BaseException:
            print(self.diagnostics())
            self.stop()
            raise
        return self

    def _start_head(self) -> None:
        for name in (
            "gcs", "dashboard", "metrics", "http", "agent_grpc", "agent_http",
            "runtime_env", "node_manager", "object_manager", "client",
            "haproxy_metrics", "haproxy_stats",
        ):  # fmt: skip
            self.ports[name] = free_port()
        # Short path: Ray's unix sockets live under it (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self._log = open(self.temp_dir / "head.log", "wb")  # noqa: SIM115
        p = self.ports
        self._head = subprocess.Popen(
            [
                str(SERVE_VENV / "bin" / "ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={p['gcs']}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={p['dashboard']}",
                f"--metrics-export-port={p['metrics']}",
                f"--dashboard-agent-grpc-port={p['agent_grpc']}",
                f"--dashboard-agent-listen-port={p['agent_http']}",
                f"--runtime-env-agent-port={p['runtime_env']}",
                f"--node-manager-port={p['node_manager']}",
                f"--object-manager-port={p['object_manager']}",
                f"--ray-client-server-port={p['client']}",
                f"--num-cpus={self.num_cpus}",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
            ],  # fmt: skip
            env=self.child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our own process group, so stop() can end all of it
        )
        self._wait_dashboard(deadline=time.monotonic() + 180)

    def deploy(self, args: dict[str, Any]) -> None:
        assert self.temp_dir is not None
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.ports["http"]},
            "applications": [
                {
                    "name": self.app_name,
                    "route_prefix": "/",
                    "import_path": self.import_path,
                    "args": args,
                }
            ],
        }
        if self.deployments:
            config["applications"][0]["deployments"] = self.deployments
        path = self.temp_dir / "serve.json"  # JSON is YAML
        path.write_text(json.dumps(config))
        # The dashboard answers /api/version before its Serve module can take a deploy;
        # on a busy machine the first PUT may be dropped, so wait and retry.
        for attempt in range(5):
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=30)
            out = self._ray("serve", "deploy", str(path), "-a", self.dashboard_url)
            if out.returncode == 0:
                return
            time.sleep(3 + 3 * attempt)
        raise RuntimeError(f"serve deploy failed: {out.stderr[-2000:]}")

    def _wait_dashboard(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self._head is not None and self._head.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._head.returncode}")
            try:
                if httpx.get(f"{self.dashboard_url}/api/version", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("Ray dashboard did not come up")

    def app_status(self) -> dict[str, Any]:
        r = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10)
        r.raise_for_status()
        return r.json().get("applications", {}).get(self.app_name, {})

    def wait_ready(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            status = self.app_status() if self._dashboard_up() else {}
            if status.get("status") == "DEPLOY_FAILED":
                raise RuntimeError(f"deploy failed: {status.get('message', '')[-3000:]}")
            try:
                r = httpx.get(f"{self.base_url}/readyz", timeout=5)
                last = r.text
                self.probe_history.append((r.status_code, r.text))
                if r.status_code == 200:
                    return
            except httpx.HTTPError as e:
                last = str(e)
            time.sleep(2)
        raise TimeoutError(f"app not ready in time; last /readyz: {last}")

    def _dashboard_up(self) -> bool:
        try:
            return httpx.get(f"{self.dashboard_url}/api/version", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def replica_pids(self, deployment_prefix: str = "LLMServer") -> list[int]:
        """PIDs of the running replicas of a deployment, from Serve's REST API."""
        deployments = self.app_status().get("deployments", {})
        return [
            int(r["pid"])
            for name, d in deployments.items()
            if name.startswith(deployment_prefix)
            for r in d.get("replicas", [])
            if r.get("state") == "RUNNING" and r.get("pid")
        ]

    def logs_text(self, pattern: str = "*") -> str:
        """Concatenated Ray session logs (replica and worker output) matching `pattern`."""
        assert self.temp_dir is not None
        logs = self.temp_dir / "session_latest" / "logs"
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(logs.rglob(pattern)) if p.is_file()
        )

    def diagnostics(self) -> str:
        try:
            return json.dumps(self.app_status(), indent=1)[-4000:]
        except Exception as e:
            return f"(no status: {e})"

    def stop(self) -> None:
        """Kill what this cluster started, and nothing else."""
        if self._head is not None and self._head.poll() is None:
            try:
                os.killpg(self._head.pid, signal.SIGTERM)
                self._head.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self._head is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._head.pid, signal.SIGKILL)
        kill_marked(MARKER, self.marker)
        if self._log is not None:
            self._log.close()


# A ChatML template: the tiny test tokenizer has none, and chat completions need one.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_test_models(directory: Path) -> tuple[Path, Path]:
    """A tiny BF16 Qwen3 and its NVFP4 checkpoint made by the worker's pipeline.

    Runs in the test interpreter (.venv: torch + ModelOpt), not in .venv-serve.
    """
    from .models import make_tiny_qwen3, quantize_nvfp4
    from .text import write_text_file

    sources = directory / "sources"
    bf16 = make_tiny_qwen3(sources / "tiny-qwen3-bf16")
    (bf16 / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    calib = write_text_file(sources / "calib.txt", max_chars=60_000)
    return bf16, quantize_nvfp4(bf16, calib, directory / "published", "tiny-qwen3-nvfp4")
