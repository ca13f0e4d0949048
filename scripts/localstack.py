"""Run the stack on one machine without Docker: Redis, a Ray head (serving) and a worker.

    python scripts/localstack.py up      # start everything, print the settings to use
    python scripts/localstack.py down    # stop exactly what `up` started
    python scripts/localstack.py env     # `export` lines for nvfp4ctl

Processes run from the two environments `make install install-serve` creates (.venv for
the worker, .venv-serve for Ray Serve + vLLM) and write their logs to .run/. Every
process gets a marker variable, so `down` stops only what `up` started, even Ray
workers that left their process group (`ray stop` would stop every Ray on the host).
Serving runs on CPU here (vLLM's CPU build); the Serve application itself is deployed
with `nvfp4ctl serve deploy`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from nvfp4_common.serving import RAY_ENV_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/devkit, shared with the tests and the demo

from devkit import processes  # noqa: E402

RUN = ROOT / ".run"
STATE = RUN / "stack.json"
MARKER = "NVFP4_LOCALSTACK_ID"

PORTS = {"redis": 6390, "gcs": 6388, "dashboard": 8265, "http": 8000, "metrics": 8080}


def _env(marker: str, models_dir: Path, roots: list[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVFP4_", "RAY_"))}
    env.update(
        {
            MARKER: marker,
            "NVFP4_REDIS_URL": f"redis://127.0.0.1:{PORTS['redis']}/0",
            "NVFP4_MODELS_DIR": str(models_dir),
            "NVFP4_MODEL_ROOTS": json.dumps([str(p) for p in roots]),
            "NVFP4_RAY_ADDRESS": f"http://127.0.0.1:{PORTS['dashboard']}",
            "NVFP4_SERVE_URL": f"http://127.0.0.1:{PORTS['http']}",
            # Serving on CPU: vLLM's CPU build, eager mode (no compile at start), 1 GiB KV.
            "NVFP4_SERVE_ACCELERATOR": "cpu",
            "NVFP4_SERVE_MAX_MODEL_LEN": "2048",
            "NVFP4_SERVE_ENGINE_KWARGS": json.dumps({"enforce_eager": True}),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_HOST_IP": "127.0.0.1",
            "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    # Serve's mode, as in compose and the chart; e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=0 in the
    # caller's environment turns it off.
    env.update({k: os.environ.get(k, v) for k, v in RAY_ENV_DEFAULTS.items()})
    return env


def _start(name: str, args: list[str], env: dict[str, str]) -> int:
    log = open(RUN / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
    )
    return proc.pid


def _wait_http(url: str, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):  # noqa: S310
            return  # answered (loopback only)
        time.sleep(1)
    raise SystemExit(f"{what} did not come up in {timeout_s:.0f} s; see {RUN}/")


def up(models_dir: Path, roots: list[Path]) -> dict[str, object]:
    if STATE.exists():
        raise SystemExit("the local stack is already up (python scripts/localstack.py down)")
    for exe in (ROOT / ".venv/bin/python", ROOT / ".venv-serve/bin/ray"):
        if not exe.exists():
            raise SystemExit(f"{exe} is missing: run `make install install-serve` first")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is missing: apt-get install redis-server")
    RUN.mkdir(exist_ok=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex[:12]
    env = _env(marker, models_dir.resolve(), [r.resolve() for r in roots])
    p = PORTS
    # Recorded before anything starts: `down` then finds by marker whatever did start.
    STATE.write_text(json.dumps({"marker": marker, "pids": {}, "env": _cli_env(env)}))
    pids = {
        "redis": _start(
            "redis",
            [redis_server, "--port", str(p["redis"]), "--bind", "127.0.0.1", "--dir", str(RUN),
             "--appendonly", "yes", "--save", ""],
            env,
        ),
        "ray": _start(
            "ray",
            [str(ROOT / ".venv-serve/bin/ray"), "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", f"--port={p['gcs']}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dashboard']}",
             f"--metrics-export-port={p['metrics']}", "--num-cpus=16",
             f"--temp-dir=/tmp/nvfp4-ray-{marker}", "--disable-usage-stats"],
            env,
        ),
    }  # fmt: skip
    STATE.write_text(json.dumps({"marker": marker, "pids": pids, "env": _cli_env(env)}))
    time.sleep(0.5)
    pids["worker"] = _start("worker", [str(ROOT / ".venv/bin/python"), "-m", "nvfp4_worker"], env)
    STATE.write_text(json.dumps({"marker": marker, "pids": pids, "env": _cli_env(env)}))
    _wait_http(f"http://127.0.0.1:{p['dashboard']}/api/version", 180, "the Ray dashboard")
    return _cli_env(env)


def _cli_env(env: dict[str, str]) -> dict[str, str]:
    names = ("NVFP4_REDIS_URL", "NVFP4_MODELS_DIR", "NVFP4_RAY_ADDRESS", "NVFP4_SERVE_URL")
    return {k: env[k] for k in names}


def marker() -> str | None:
    """The marker of the running stack's processes, None when it is not up."""
    return str(json.loads(STATE.read_text())["marker"]) if STATE.exists() else None


def marked_pids(marker: str) -> list[int]:
    """Processes carrying the stack's marker: what `down` must leave none of."""
    return processes.marked_pids(MARKER, marker)


def down() -> None:
    if not STATE.exists():
        print("the local stack is not running")
        return
    state = json.loads(STATE.read_text())
    # The worker first, so it can hand a running job back to the queue.
    for name in ("worker", "ray", "redis"):
        pid = state["pids"].get(name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                break
            time.sleep(0.2)
    processes.kill_marked(MARKER, state["marker"])  # Ray and vLLM processes that left the group
    shutil.rmtree(f"/tmp/nvfp4-ray-{state['marker']}", ignore_errors=True)
    STATE.unlink()
    print("local stack stopped")


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return (Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]) == "Z"
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model-root", type=Path, action="append", default=[],
                        help="extra folder jobs may read models and data from")  # fmt: skip
    args = parser.parse_args()
    if args.command == "up":
        env = up(args.models_dir, args.model_root)
        print("local stack is up; logs in .run/. For nvfp4ctl:")
        for k, v in env.items():
            print(f"  export {k}={v}")
    elif args.command == "down":
        down()
    else:
        if not STATE.exists():
            sys.exit("the local stack is not running")
        for k, v in json.loads(STATE.read_text())["env"].items():
            print(f"export {k}={v}")


if __name__ == "__main__":
    main()
