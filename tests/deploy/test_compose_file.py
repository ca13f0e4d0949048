"""docker-compose.yml, checked with the real docker-compose (1.29, no engine needed).

What cannot run here: the services themselves (no Docker engine, no GPU). Redis's command
line from the compose file does run, against the local redis-server.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from nvfp4_common.serving import RAY_ENV_DEFAULTS, RAY_ENV_INGRESS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# The GPU path (`make up`) merges the GPU reservation over the stack; the CPU profile
# (`make up CPU=1`) merges docker-compose.cpu.yml instead.
GPU_FILE = ROOT / "docker-compose.gpu.yml"
CPU_FILE = ROOT / "docker-compose.cpu.yml"
# 128 GB of LPDDR5x as the OS counts it (GiB); what GB10's CUDA reports is close to it.
SPARK_MEMORY_GIB = 128e9 / 2**30
# Left for the OS, Docker, Redis, Ray's own processes and the serving process outside
# vLLM's pool (CUDA context, Python, tokenizer): see docs/operations.md "Memory".
MIN_HEADROOM_GIB = 12.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _compose() -> str:
    # A missing tool fails, as helm does for the chart tests: a skip would let CI pass
    # without checking the compose file at all (.ci/run installs it).
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not installed: apt-get install docker-compose"
            " (1.29 checks the file with no Docker engine)",
            pytrace=False,
        )
    return exe


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Dummy values for the required variables; a temporary env_file stands in for .env."""
    env_file = tmp_path / "env"
    env_file.write_text("NVFP4_MAX_ATTEMPTS=3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")}
    env.update(
        NVFP4_REDIS_PASSWORD="test-redis-password",
        NVFP4_RAY_AUTH_TOKEN="test-ray-token",
        NVFP4_ENV_FILE=str(env_file),
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The GPU stack as docker-compose resolves it (variables filled in)."""
    out = subprocess.run(
        [_compose(), "-f", str(COMPOSE_FILE), "-f", str(GPU_FILE), "config"],
        env=_env(tmp_path_factory.mktemp("compose")),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return yaml.safe_load(out.stdout)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def _gib(size: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)b?", size.lower()).groups()  # type: ignore[union-attr]
    return float(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit] / 2**30


@pytest.mark.parametrize("profile", [[], [GPU_FILE], [CPU_FILE]], ids=["base", "gpu", "cpu"])
def test_config_is_valid(tmp_path: Path, profile: list[Path]) -> None:
    files = [arg for f in [COMPOSE_FILE, *profile] for arg in ("-f", str(f))]
    out = subprocess.run(
        [_compose(), *files, "config", "-q"],
        env=_env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def test_cpu_profile_reserves_no_gpu_and_runs_vllm_on_cpu(tmp_path: Path) -> None:
    out = subprocess.run(
        [_compose(), "-f", str(COMPOSE_FILE), "-f", str(CPU_FILE), "config"],
        env=_env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    services = yaml.safe_load(out.stdout)["services"]
    for name in ("serve", "worker"):
        assert "devices" not in str(services[name].get("deploy", {})), name
    assert services["serve"]["environment"]["NVFP4_SERVE_ACCELERATOR"] == "cpu"
    assert services["worker"]["environment"]["NVFP4_DEVICE"] == "cpu"
    # The serving health check still means one generated token.
    assert "/readyz" in str(services["serve"]["healthcheck"]["test"])


def test_env_example_names_the_gpu_files_for_plain_compose_commands() -> None:
    text = (ROOT / ".env.example").read_text()
    assert "\nCOMPOSE_FILE=docker-compose.yml:docker-compose.gpu.yml\n" in text


@pytest.mark.parametrize("missing", ["NVFP4_REDIS_PASSWORD", "NVFP4_RAY_AUTH_TOKEN"])
def test_refuses_to_start_without_a_required_secret(tmp_path: Path, missing: str) -> None:
    env = _env(tmp_path)
    del env[missing]
    out = subprocess.run(
        [_compose(), "-f", str(COMPOSE_FILE), "config", "-q"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert f"set {missing} in .env" in out.stderr


def test_gpus_are_reserved_through_deploy_devices(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    for name in ("serve", "worker"):
        svc = services[name]
        assert "gpus" not in svc  # compose 1.29 rejects it; deploy.resources is portable
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_serve_ports_health_volumes_and_keys(rendered: dict[str, Any]) -> None:
    serve = rendered["services"]["serve"]
    published = {
        int(p["target"]) if isinstance(p, dict) else int(re.split("[:/]", p)[-2])
        for p in serve["ports"]
    }
    assert {8000, 8080} <= published
    assert "/readyz" in " ".join(serve["healthcheck"]["test"])
    mounts = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in serve["volumes"]}
    assert {"/data/models", "/data/hf-cache"} <= mounts
    assert _gib(serve["shm_size"]) >= 2
    assert [s if isinstance(s, str) else s["source"] for s in serve["secrets"]] == ["api_keys"]
    assert serve["environment"]["NVFP4_SERVE_API_KEY_FILE"] == "/run/secrets/api_keys"


def ray_serve_env(rendered: dict[str, Any]) -> dict[str, str]:
    """The serve container's RAY_SERVE_* variables, as compose resolves them."""
    env = rendered["services"]["serve"]["environment"]
    return {k: str(v) for k, v in env.items() if k.startswith("RAY_SERVE_")}


def test_serve_runs_ray_serve_with_the_shared_env_defaults(rendered: dict[str, Any]) -> None:
    """Compose sets exactly nvfp4_common.serving.RAY_ENV_DEFAULTS, the defaults the chart,
    the local stack and the test cluster use (tests/helm checks the chart's)."""
    assert ray_serve_env(rendered) == RAY_ENV_DEFAULTS


def serve_env_with(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The serve container's RAY_SERVE_* variables with `variables` set (as in .env)."""
    out = subprocess.run(
        [_compose(), "-f", str(COMPOSE_FILE), "config"],
        env=_env(tmp_path, **variables),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return ray_serve_env(yaml.safe_load(out.stdout))


def test_throughput_optimized_serve_can_be_turned_off(tmp_path: Path) -> None:
    env = serve_env_with(tmp_path, NVFP4_RAY_SERVE_THROUGHPUT_OPTIMIZED="0")
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


def test_direct_streaming_is_one_switch(tmp_path: Path) -> None:
    env = serve_env_with(tmp_path, NVFP4_DIRECT_STREAMING="0")
    assert env == {**RAY_ENV_DEFAULTS, **RAY_ENV_INGRESS}


def test_worker_waits_for_redis_and_gets_time_to_stop_a_job(rendered: dict[str, Any]) -> None:
    worker = rendered["services"]["worker"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    grace = float(worker["environment"]["NVFP4_CANCEL_GRACE_S"])
    # The worker SIGTERMs the job, waits `grace`, SIGKILLs, waits up to 10 s, re-queues.
    assert _seconds(worker["stop_grace_period"]) >= grace + 10 + 15
    mounts = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in worker["volumes"]}
    assert {"/data/models", "/data/hf-cache"} <= mounts


def test_memory_split_leaves_headroom_on_a_spark(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    serve_share = float(services["serve"]["environment"]["NVFP4_SERVE_GPU_MEMORY_UTILIZATION"])
    worker_cap = _gib(str(services["worker"]["mem_limit"]))
    left = SPARK_MEMORY_GIB - serve_share * SPARK_MEMORY_GIB - worker_cap
    assert left >= MIN_HEADROOM_GIB, f"only {left:.1f} GiB left for the OS and runtimes"


def test_redis_persists_with_aof_on_a_volume(rendered: dict[str, Any]) -> None:
    redis_svc = rendered["services"]["redis"]
    command = " ".join(redis_svc["command"])
    assert "--appendonly yes" in command
    assert any(str(v).startswith("redis-data:/data") for v in redis_svc["volumes"])
    assert redis_svc["healthcheck"]["test"]


def test_observability_is_an_optional_profile(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    for name in ("prometheus", "grafana", "redis-exporter"):
        assert services[name]["profiles"] == ["observability"]
    for name in ("redis", "serve", "worker"):
        assert "profiles" not in services[name]


def test_redis_command_and_healthcheck_work_with_a_real_redis(tmp_path: Path) -> None:
    """Run the compose file's Redis command line (paths and port moved) with redis-server."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["redis"]
    script = raw["command"][2].replace("$$", "$")  # compose's escape for a literal $
    health = raw["healthcheck"]["test"][1].replace("$$", "$")
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    run_dir.mkdir()
    data_dir.mkdir()
    port = free_port()
    script = script.replace("/run/redis", str(run_dir)).replace("--dir /data", f"--dir {data_dir}")
    script += f" --port {port} --bind 127.0.0.1"
    password = "pw-with-$-and-'quote"
    env = {**os.environ, "NVFP4_REDIS_PASSWORD": password}
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password=password)
        deadline = time.time() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.time() < deadline, "redis did not start"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert client.config_get("appendonly")["appendonly"] == "yes"
        # The password is in a file only its owner can read, not on the command line.
        assert (run_dir / "auth.conf").stat().st_mode & 0o077 == 0
        assert password not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0"))
        health = health.replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run(["sh", "-c", health], env=env).returncode == 0
        bad = {**env, "NVFP4_REDIS_PASSWORD": "wrong"}
        assert subprocess.run(["sh", "-c", health], env=bad).returncode != 0
    finally:
        proc.terminate()
        proc.wait(10)
