"""Our endpoint (Ray Serve + `nvfp4_serve.app:build_app`, API keys on) against vLLM's own
OpenAI server, on the same GPU, checkpoint and engine settings.

Streaming /v1/completions, a ~130-token text prompt, 128 generated tokens (`ignore_eos`),
at concurrency 1 and 16 (`--concurrency`): output tok/s, TTFT p50/p95, start-up to first
answer, and each endpoint's ratios to plain vLLM at the same concurrency. Token counts come
from the usage record (Ray Serve may pack tokens into one chunk). One server at a time:
ours, then plain vLLM, then each `--variant` (another configuration of ours, as in
bench/serve_overhead.py: NAME=KEY=VALUE,...; upper-case keys are Ray cluster environment
variables, others build_app args), each only if enough of `--deadline-s` is left.
`--append` adds to an earlier run's JSON on the same machine (a second call when all do
not fit one), reusing its plain-vLLM rows as the baseline.

    python3 bench/gpu_serve.py --model /tmp/models/published/X --ray-prefix /tmp/site \
        --out bench/results/gpu_serve.json
    python3 bench/gpu_serve.py ... --append --skip-ours --skip-plain \
        --variant batcher=first_chunk_now=false
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_vllm import CAPTURE_SIZES, engine_kwargs  # noqa: E402
from serve_overhead import parse_variant  # noqa: E402

from tests import serve_harness  # noqa: E402
from tests.fixtures import text  # noqa: E402

API_KEY = "bench-key"
NAME = "bench"


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> dict:
    body = {
        "model": NAME,
        "prompt": prompt,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    n_out = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                n_out = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if first is None or n_out != tokens:
        raise RuntimeError(f"stream gave {n_out} tokens, asked for {tokens}")
    return {"ttft_s": first - start, "tokens": n_out, "total_s": end - start}


async def load(
    base: str, key: str | None, conc: int, requests: int, tokens: int, prompt: str
) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{base}/v1/completions"
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        await asyncio.gather(*(one_request(client, url, prompt, 8) for _ in range(conc)))
        pending = list(range(requests))
        results: list[dict[str, float]] = []

        async def worker() -> None:
            while pending:
                pending.pop()
                results.append(await one_request(client, url, prompt, tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in results)
    return {
        "concurrency": conc,
        "requests": len(results),
        "tokens_per_request": tokens,
        "tok_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
        "ttft_p95_ms": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] * 1000, 1),
        "per_request_tok_s": round(
            statistics.median((r["tokens"] - 1) / (r["total_s"] - r["ttft_s"]) for r in results), 1
        ),
    }


def plain_vllm(model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = serve_harness.free_port()
    kwargs = engine_kwargs(args.eager)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-model-len", str(args.max_len), "--gpu-memory-utilization", "0.85"]
    cmd += ["--max-num-seqs", str(kwargs["max_num_seqs"]), "--seed", "0"]
    if args.eager:
        cmd += ["--enforce-eager"]
    else:
        cmd += ["--compilation-config", json.dumps(kwargs["compilation_config"])]
    handle = log.open("wb")
    proc = subprocess.Popen(
        cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy()
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            body = {"model": NAME, "prompt": "hi", "max_tokens": 1}
            if httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_proc(proc)
    raise TimeoutError("vLLM did not start in time")


def stop_proc(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


PLAIN = "plain vLLM OpenAI server"


def bench_target(label: str, base: str, key: str | None, args: argparse.Namespace) -> list[dict]:
    prompt = text.corpus(460)
    rows = []
    for conc in args.concurrency:
        row = asyncio.run(load(base, key, conc, max(8, 4 * conc), args.tokens, prompt))
        row["target"] = label
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each row's throughput ratio and extra TTFT p50 against plain vLLM at its concurrency."""
    plain = {r["concurrency"]: r for r in rows if r["target"] == PLAIN}
    for r in rows:
        p = plain.get(r["concurrency"])
        if p is None or r is p:
            continue
        r["tok_s_ratio"] = round(r["tok_s"] / p["tok_s"], 3)
        r["extra_ttft_p50_ms"] = round(r["ttft_p50_ms"] - p["ttft_p50_ms"], 1)


def run_ours(
    label: str,
    env: dict[str, str],
    app: dict[str, Any],
    args: argparse.Namespace,
    result: dict[str, Any],
) -> None:
    t0 = time.monotonic()
    cluster = serve_harness.ServeCluster(
        app_args={
            "model": str(args.model),
            "model_name": NAME,
            "accelerator": "gpu",
            "max_model_len": args.max_len,
            "gpu_memory_utilization": 0.85,
            "engine_kwargs": engine_kwargs(args.eager),
            **app,
        },
        env={"NVFP4_SERVE_API_KEYS": json.dumps([API_KEY]), **env},
        num_cpus=8,
    )
    try:
        cluster.start(timeout_s=args.start_timeout_s)
        result["startup_s"][label] = round(time.monotonic() - t0, 1)
        result["rows"] += bench_target(label, cluster.base_url, API_KEY, args)
    except Exception as exc:  # recorded, then the next server still runs
        result["errors"][label] = f"{type(exc).__name__}: {str(exc)[-2500:]}"
        logs = cluster.logs_text("*.log") if cluster.temp_dir else ""
        tail = [x for x in logs.splitlines() if "Error" in x or "error" in x][-30:]
        result["errors"][label + "_log"] = "\n".join(tail)[-4000:]
        print(result["errors"], flush=True)
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ray-prefix", type=Path, required=True, help="folder of bin/ray")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--start-timeout-s", type=float, default=420)
    parser.add_argument("--deadline-s", type=float, default=560)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--variant", type=parse_variant, action="append", default=[])
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--append", action="store_true", help="add to --out's earlier rows")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_serve.json")
    args = parser.parse_args()
    started = time.monotonic()
    # The harness runs `ray` and `serve` from this prefix (a venv, or the GPU site dir).
    serve_harness.SERVE_VENV = args.ray_prefix
    result: dict[str, Any] = {
        "model": str(args.model),
        "settings": {
            "cuda_graphs": not args.eager,
            "capture_sizes": None if args.eager else CAPTURE_SIZES,
            "max_model_len": args.max_len,
            "gpu_memory_utilization": 0.85,
            "generated_tokens": args.tokens,
        },
        "variants": {},
        "rows": [],
        "startup_s": {},
        "errors": {},
    }
    if args.append and args.out.exists():
        result = json.loads(args.out.read_text())
        result.setdefault("variants", {})

    def save() -> None:
        add_ratios(result["rows"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def time_left(label: str) -> bool:
        left = args.deadline_s - (time.monotonic() - started)
        if left < 200:
            result["errors"][label] = f"not run: only {left:.0f} s of the deadline left"
            return False
        args.start_timeout_s = min(args.start_timeout_s, left - 60)
        return True

    servers: list[tuple[str, dict[str, str], dict[str, Any]]] = []
    if not args.skip_ours:
        servers.append(("ours (Ray Serve build_app)", {}, {}))
    if not args.skip_plain:
        servers.append((PLAIN, {}, {}))
    servers += [(f"ours: {name}", env, app) for name, env, app in args.variant]
    for label, env, app in servers:
        result["errors"].pop(label, None)  # an --append run may retry what did not fit before
        if not time_left(label):
            continue
        if label != PLAIN:
            result["variants"][label] = {"env": env, "args": app}
            run_ours(label, env, app, args, result)
            save()
            continue
        t0 = time.monotonic()
        try:
            proc, base = plain_vllm(args.model, args, args.log_dir / "vllm_server.log")
            result["startup_s"]["plain"] = round(time.monotonic() - t0, 1)
            try:
                result["rows"] += bench_target(PLAIN, base, None, args)
            finally:
                stop_proc(proc)
        except Exception as exc:
            result["errors"]["plain"] = f"{type(exc).__name__}: {str(exc)[-2500:]}"
        save()
    save()
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
