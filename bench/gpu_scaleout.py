"""Scale-out through Ray Serve: one Ray cluster on a multi-GPU machine, the same
`nvfp4_serve.app:build_app` application with 1 and then 2 engine replicas (one GPU each).

The app is deployed with `accelerator: gpu, num_replicas: 1` plus a Serve config override
of the engine deployment's `num_replicas`; scaling to 2 changes only that override, which
Ray applies as a lightweight update: the running replica stays and one more is placed on
the free GPU. nvidia-smi, read after each phase, shows which GPUs hold an engine.

Load: streaming /v1/completions with `nvfp4_admin.loadgen`, as in bench/gpu_serve.py
(~130-token prompt, 128 generated tokens, `ignore_eos`), spread over several client
processes so that the client's own JSON parsing does not cap two replicas. Output tok/s,
TTFT p50/p95 per concurrency, and the ratio of 2 to 1 replicas.

Phases `one` and `two` let the two halves run as separate commands: `one` leaves the
cluster running (its processes are in their own session) and writes `--state`; `two`
attaches to it, scales, measures and stops it. `all` does both in one process.

    python3 bench/gpu_scaleout.py all --model /tmp/models/X --ray-prefix /tmp/site \
        --out bench/results/gpu_scaleout.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from gpu_serve import API_KEY, NAME, serve_row
from gpu_vllm import CAPTURE_SIZES, engine_kwargs

from devkit import serve_cluster, text
from nvfp4_admin.loadgen import LevelStats, LoadGenerator, RequestStats

ROOT = Path(__file__).resolve().parents[1]
# Ray Serve LLM names the engine deployment "LLMServer:<model id>".
ENGINE = f"LLMServer:{NAME}"
GPU_MEMORY_UTILIZATION = 0.85
# A GPU with more than this in use holds an engine (weights alone are ~15 GiB here).
ENGINE_MIB = 10 * 1024


def gpu_usage() -> list[dict[str, Any]]:
    """nvidia-smi's view of every GPU: index, name, MiB used and total."""
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,name,memory.used,memory.total",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        index, name, used, total = (x.strip() for x in line.split(","))
        rows.append(
            {"index": int(index), "name": name, "used_mib": int(used), "total_mib": int(total)}
        )
    return rows


def _client(
    base: str, conc: int, requests: int, tokens: int, prompt: str, barrier: Any, queue: Any
) -> None:
    """One client process: warm up, wait for the others, then run `requests` at `conc`."""

    async def run() -> dict[str, Any]:
        gen = LoadGenerator(base, NAME, API_KEY, 0, tokens, timeout_s=600, prompt=prompt)
        await gen.level(conc, max_tokens=8)
        barrier.wait()  # blocking on purpose: nothing else runs in this loop yet
        t0 = time.time()
        stats = await gen.level(conc, requests)
        return {"t0": t0, "t1": time.time(), "requests": stats.requests, "errors": stats.errors}

    try:
        queue.put(asyncio.run(run()))
    except Exception as exc:  # reported to the parent, which raises it
        barrier.abort()
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def load(base: str, conc: int, requests: int, tokens: int, processes: int) -> dict[str, Any]:
    """Run `requests` streaming completions at `conc` in flight, over `processes` clients."""
    prompt = text.corpus(460)
    procs = max(1, min(processes, conc))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    queue = ctx.Queue()
    workers = [
        ctx.Process(
            target=_client,
            args=(base, conc // procs + (i < conc % procs), requests // procs, tokens, prompt),
            kwargs={"barrier": barrier, "queue": queue},
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    parts = [queue.get(timeout=900) for _ in workers]
    for w in workers:
        w.join(30)
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        raise RuntimeError(f"client failed: {errors[0]}")
    wall = max(p["t1"] for p in parts) - min(p["t0"] for p in parts)
    requests_done: list[RequestStats] = [r for p in parts for r in p["requests"]]
    stats = LevelStats(conc, wall, requests_done, [e for p in parts for e in p["errors"]])
    return {**serve_row(stats, tokens), "client_processes": procs}


def bench(cluster: serve_cluster.ServeCluster, replicas: int, args: argparse.Namespace) -> list:
    rows = []
    for conc in args.concurrency:
        row = load(cluster.base_url, conc, args.requests_per_slot * conc, args.tokens, args.clients)
        row["replicas"] = replicas
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def wait_replicas(
    cluster: serve_cluster.ServeCluster, n: int, timeout_s: float, peaks: dict[str, int]
) -> None:
    """Until the engine deployment has `n` RUNNING replicas and the app is RUNNING.

    `peaks` collects the most memory each GPU held meanwhile: when a new replica fails,
    it shows which GPU its engine tried to use.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for g in gpu_usage():
            peaks[str(g["index"])] = max(peaks.get(str(g["index"]), 0), g["used_mib"])
        status = cluster.app_status()
        if status.get("status") == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {status.get('message', '')[-3000:]}")
        if status.get("status") == "RUNNING" and len(cluster.replica_pids()) == n:
            cluster.wait_ready(deadline=deadline)
            return
        time.sleep(3)
    raise TimeoutError(f"{n} replicas not running in {timeout_s:.0f} s: {cluster.diagnostics()}")


def make_cluster(args: argparse.Namespace, override: bool) -> serve_cluster.ServeCluster:
    return serve_cluster.ServeCluster(
        app_args={
            "model": str(args.model),
            "model_name": NAME,
            "accelerator": "gpu",
            "num_replicas": 1,
            "max_model_len": args.max_len,
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
            "engine_kwargs": engine_kwargs(args.eager),
        },
        deployments=[{"name": ENGINE, "num_replicas": 1}] if override else [],
        env={"NVFP4_SERVE_API_KEYS": json.dumps([API_KEY])},
        num_cpus=16,
    )


# Wrappers that only say "see above"; the root cause is the other exception lines.
WRAPPERS = ("Engine core initialization failed", "RayTaskError", "raise RuntimeError")
ROOT_CAUSE = re.compile(r"^\s*(\w+\.)*\w*(Error|Exception)\b: .+")


def root_causes(cluster: serve_cluster.ServeCluster, dump: Path) -> list[str]:
    """Distinct exception lines from Ray's session logs; the logs that hold one go to `dump`."""
    if cluster.temp_dir is None:
        return []
    logs = cluster.temp_dir / "session_latest" / "logs"
    found: list[str] = []
    parts: list[str] = []
    for path in sorted(p for p in logs.rglob("*") if p.is_file()):
        body = path.read_text(errors="replace")
        lines = [x.strip() for x in body.splitlines() if ROOT_CAUSE.match(x)]
        lines = [x for x in lines if not any(w in x for w in WRAPPERS)]
        if lines:
            parts.append(f"==> {path.relative_to(logs)} <==\n{body[-200_000:]}")
        found += [x[:400] for x in lines if x[:400] not in found]
    dump.write_text("\n".join(parts)[-4_000_000:])
    return found[:40]


def phase_one(args: argparse.Namespace, result: dict[str, Any]) -> serve_cluster.ServeCluster:
    """Start Ray, deploy 1 replica, measure; the cluster is left running."""
    t0 = time.monotonic()
    cluster = make_cluster(args, override=True)
    try:
        cluster.start(timeout_s=args.start_timeout_s)
        result["scale_mode"] = "override"
    except RuntimeError as exc:
        if "nonexistent" not in str(exc) and "does not exist" not in str(exc):
            raise
        # Ray did not know the engine's name: scale through the builder's args instead
        # (a new code version, so Ray restarts the replicas).
        result["errors"]["override"] = str(exc)[-500:]
        cluster = make_cluster(args, override=False)
        cluster.start(timeout_s=args.start_timeout_s)
        result["scale_mode"] = "args"
    result["startup_s"]["one_replica"] = round(time.monotonic() - t0, 1)
    result["gpus"]["one_replica"] = gpu_usage()
    result["rows"] += bench(cluster, 1, args)
    return cluster


def phase_two(
    cluster: serve_cluster.ServeCluster, args: argparse.Namespace, result: dict[str, Any]
) -> None:
    """Scale the running app to 2 replicas, check both GPUs, measure."""
    t0 = time.monotonic()
    if result.get("scale_mode") == "override":
        cluster.deployments = [{"name": ENGINE, "num_replicas": 2}]
    else:
        cluster.app_args = {**cluster.app_args, "num_replicas": 2}
    cluster.deploy(cluster.app_args)
    time.sleep(5)  # let Serve take the new target before counting replicas
    peaks: dict[str, int] = {}
    result["gpus"]["peak_mib_while_scaling"] = peaks
    wait_replicas(cluster, 2, args.start_timeout_s, peaks)
    result["startup_s"]["scale_to_two"] = round(time.monotonic() - t0, 1)
    gpus = gpu_usage()
    result["gpus"]["two_replicas"] = gpus
    loaded = [g["index"] for g in gpus if g["used_mib"] > ENGINE_MIB]
    result["gpus_with_engine"] = loaded
    if len(loaded) < 2:
        result["errors"]["placement"] = f"only GPUs {loaded} hold an engine"
    result["rows"] += bench(cluster, 2, args)
    one = {r["concurrency"]: r["tok_s"] for r in result["rows"] if r["replicas"] == 1}
    two = {r["concurrency"]: r["tok_s"] for r in result["rows"] if r["replicas"] == 2}
    result["ratio"] = {str(c): round(two[c] / one[c], 2) for c in two if c in one}


def save_state(path: Path, cluster: serve_cluster.ServeCluster, result: dict[str, Any]) -> None:
    state = {
        "marker": cluster.marker,
        "ports": cluster.ports,
        "temp_dir": str(cluster.temp_dir),
        "app_args": cluster.app_args,
        "deployments": cluster.deployments,
        "result": result,
    }
    path.write_text(json.dumps(state, indent=1))


def attach(path: Path, args: argparse.Namespace) -> tuple[serve_cluster.ServeCluster, dict]:
    state = json.loads(path.read_text())
    cluster = make_cluster(args, override=bool(state["deployments"]))
    cluster.marker = state["marker"]
    cluster.ports = state["ports"]
    cluster.temp_dir = Path(state["temp_dir"])
    cluster.app_args = state["app_args"]
    return cluster, state["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["all", "one", "two"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ray-prefix", type=Path, required=True, help="folder of bin/ray")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests = this x conc")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--start-timeout-s", type=float, default=420)
    parser.add_argument("--state", type=Path, default=Path("/tmp/scaleout_state.json"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_scaleout.json")
    args = parser.parse_args()
    # The harness runs `ray` and `serve` from this prefix (a venv, or the GPU site dir).
    serve_cluster.SERVE_VENV = args.ray_prefix

    if args.phase == "two":
        cluster, result = attach(args.state, args)
    else:
        result = {
            "model": str(args.model),
            "settings": {
                "cuda_graphs": not args.eager,
                "capture_sizes": None if args.eager else CAPTURE_SIZES,
                "max_model_len": args.max_len,
                "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
                "max_num_seqs_per_replica": engine_kwargs(args.eager)["max_num_seqs"],
                "generated_tokens": args.tokens,
            },
            "rows": [],
            "startup_s": {},
            "gpus": {},
            "errors": {},
        }
        cluster = None

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    keep_running = False
    try:
        if cluster is None:
            cluster = phase_one(args, result)
        if args.phase == "one":
            save_state(args.state, cluster, result)
            keep_running = True
        else:
            phase_two(cluster, args, result)
    except Exception as exc:
        result["errors"][args.phase] = f"{type(exc).__name__}: {str(exc)[-2500:]}"
        if cluster is not None:
            dump = args.out.with_name(f"{args.out.stem}_{args.phase}_logs.txt")
            result["errors"][f"{args.phase}_causes"] = root_causes(cluster, dump)
        print(result["errors"], flush=True)
    finally:
        save()
        if cluster is not None and not keep_running:
            cluster.stop()
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
