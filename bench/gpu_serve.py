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

The client is `nvfp4_admin.loadgen`, the one behind `nvfp4ctl bench` (TTFT: from just
before the request is sent to the first chunk with generated text). With `--vllm-bench`,
vLLM's own `vllm bench serve` (random 128-token prompts, `--random-output-len --tokens`,
`--ignore-eos`, `--max-concurrency N`) also runs against each endpoint after our client at
each concurrency; its figures go into the same row under "vllm_bench" and into the table.

    python3 bench/gpu_serve.py --model /tmp/models/published/X --ray-prefix /tmp/site \
        --out bench/results/gpu_serve.json
    python3 bench/gpu_serve.py ... --append --skip-ours --skip-plain \
        --variant batcher=first_chunk_now=false
    python3 bench/gpu_serve.py ... --concurrency 1 16 64 128 --vllm-bench \
        --vllm-bin /tmp/site/bin/vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from gpu_vllm import CAPTURE_SIZES, engine_kwargs
from serve_overhead import GeneratingCluster, parse_variant, split_builder

from devkit import pyspy, serve_cluster, text, vllm_bench
from nvfp4_admin.loadgen import LevelStats, LoadGenerator

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "bench-key"
NAME = "bench"


def serve_row(stats: LevelStats, tokens: int) -> dict[str, Any]:
    """One concurrency level as a row of this benchmark's JSON (and gpu_tables.py's table).

    Raises RuntimeError when a request failed or generated other than `tokens` tokens.
    """
    if stats.errors:
        raise RuntimeError(f"{len(stats.errors)} request(s) failed, e.g. {stats.errors[0]}")
    wrong = [r.tokens for r in stats.requests if r.tokens != tokens]
    if wrong:
        raise RuntimeError(f"a stream gave {wrong[0]} tokens, asked for {tokens}")
    s = stats.summary()
    return {
        "concurrency": stats.concurrency,
        "requests": s["requests"],
        "tokens_per_request": tokens,
        "tok_s": s["throughput_tok_s"],
        "ttft_p50_ms": s["ttft_p50_ms"],
        "ttft_p95_ms": s["ttft_p95_ms"],
        "per_request_tok_s": s["decode_tok_s_per_stream"],
    }


async def load(
    base: str, key: str | None, conc: int, requests: int, tokens: int, prompt: str
) -> dict[str, Any]:
    """`conc` short warm-up streams, then `requests` streams with `conc` in flight."""
    gen = LoadGenerator(base, NAME, key, 0, tokens, timeout_s=600, prompt=prompt)
    await gen.level(conc, max_tokens=8)  # connections open, this batch size's graphs warm
    return serve_row(await gen.level(conc, requests), tokens)


def plain_vllm(model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = serve_cluster.free_port()
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
LEVEL_ROOM_S = 60


def bench_target(
    label: str, base: str, key: str | None, args: argparse.Namespace, add: Callable[[dict], None]
) -> list[dict]:
    """Our client at each concurrency, then (with --vllm-bench) `vllm bench serve` too; each
    level's row goes to `add` as soon as it is measured, so a later level that stalls (it
    fails after --level-timeout-s) loses only itself."""
    prompt = text.corpus(460)
    rows = []
    for conc in args.concurrency:
        # A level (both clients) takes up to about a minute; one that cannot end before
        # --deadline-s is not started, so the call ends with its results instead of
        # being stopped mid-level.
        if time.monotonic() + LEVEL_ROOM_S > args.ends_at:
            raise TimeoutError(f"not run from {conc} streams on: the deadline is too near")
        measure = load(base, key, conc, max(8, 4 * conc), args.tokens, prompt)
        try:
            row = asyncio.run(asyncio.wait_for(measure, args.level_timeout_s))
        except TimeoutError:
            raise TimeoutError(f"{conc} streams took over {args.level_timeout_s:.0f} s") from None
        row["target"] = label
        if args.vllm_bench:
            row["vllm_bench"] = run_vllm_bench(label, base, key, conc, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
        add(row)
    if args.profile_s:
        result = profile_under_load(base, key, rows, args, prompt)
        print(json.dumps({"profile": label, **result})[:4000], flush=True)
        args.profiles[label] = result
    return rows


def profile_under_load(
    base: str, key: str | None, rows: list[dict], args: argparse.Namespace, prompt: str
) -> dict[str, Any]:
    """py-spy on every serving process while `--profile-concurrency` streams run."""
    conc = args.profile_concurrency
    measured = next((r["tok_s"] for r in rows if r["concurrency"] == conc), 1000.0)
    # Enough requests to keep the load up a few seconds past the recording.
    requests = max(4 * conc, int(measured * (args.profile_s + 8) / args.tokens))
    found: dict[str, Any] = {}

    def record() -> None:
        time.sleep(3)  # past the warm-up and the first wave's prefills
        found.update(pyspy.profile(args.profile_s))

    recorder = threading.Thread(target=record)
    recorder.start()
    try:
        row = asyncio.run(load(base, key, conc, requests, args.tokens, prompt))
    finally:
        recorder.join()
    return {"concurrency": conc, "seconds": args.profile_s, "tok_s": row["tok_s"], **found}


def run_vllm_bench(
    label: str, base: str, key: str | None, conc: int, args: argparse.Namespace
) -> dict[str, Any]:
    """`vllm bench serve` at `conc` against `base`; its figures, or {"error": ...}."""
    slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
    result = f"{slug}-c{conc}.json"
    cmd = vllm_bench.command(
        args.vllm_bin,
        base,
        NAME,
        args.model,
        conc,
        max(args.vllm_bench_min_prompts, 4 * conc),
        args.vllm_bench_dir,
        result,
        input_len=args.vllm_bench_input_len,
        output_len=args.tokens,
    )
    try:
        return vllm_bench.run(
            cmd, key, args.vllm_bench_dir / result, timeout_s=args.level_timeout_s
        )
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}


def add_ratios(rows: list[dict]) -> None:
    """Each row's throughput ratio and extra TTFT p50 against plain vLLM at its concurrency,
    by our client and (where both rows have it) by `vllm bench serve`."""
    plain = {r["concurrency"]: r for r in rows if r["target"] == PLAIN}
    for r in rows:
        p = plain.get(r["concurrency"])
        if p is None or r is p:
            continue
        r["tok_s_ratio"] = round(r["tok_s"] / p["tok_s"], 3)
        r["extra_ttft_p50_ms"] = round(r["ttft_p50_ms"] - p["ttft_p50_ms"], 1)
        ours, theirs = r.get("vllm_bench") or {}, p.get("vllm_bench") or {}
        if ours.get("tok_s") and theirs.get("tok_s"):
            ours["tok_s_ratio"] = round(ours["tok_s"] / theirs["tok_s"], 3)
        if ours.get("ttft_p50_ms") is not None and theirs.get("ttft_p50_ms") is not None:
            ours["extra_ttft_p50_ms"] = round(ours["ttft_p50_ms"] - theirs["ttft_p50_ms"], 1)


def run_ours(
    label: str,
    env: dict[str, str],
    app: dict[str, Any],
    args: argparse.Namespace,
    result: dict[str, Any],
    add: Callable[[dict], None],
) -> None:
    t0 = time.monotonic()
    builder, app = split_builder(app)
    # Another builder may have no /readyz: that cluster is ready when it generates.
    cluster = (GeneratingCluster if builder else serve_cluster.ServeCluster)(
        import_path=builder or serve_cluster.ServeCluster.import_path,
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
        bench_target(label, cluster.base_url, API_KEY, args, add)
    except Exception as exc:  # recorded, then the next server still runs
        result["errors"][label] = f"{type(exc).__name__}: {str(exc)[-2500:]}"
        logs = cluster.logs_text("*.log") if cluster.temp_dir else ""
        # HAProxy says why it exited on an [ALERT] line after the error's first line.
        keep = ("Error", "error", "ALERT")
        tail = [x for x in logs.splitlines() if any(k in x for k in keep)][-30:]
        result["errors"][label + "_log"] = "\n".join(tail)[-4000:]
        print(result["errors"], flush=True)
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ray-prefix", type=Path, required=True, help="folder of bin/ray")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16], help="e.g. 1 16 64 128"
    )
    parser.add_argument(
        "--vllm-bench",
        action="store_true",
        help="also run `vllm bench serve` at each concurrency against each endpoint",
    )
    parser.add_argument(
        "--vllm-bin",
        default=shutil.which("vllm") or "vllm",
        help="the vllm command (default: `vllm` on PATH; /tmp/site/bin/vllm on the GPU host)",
    )
    parser.add_argument("--vllm-bench-dir", type=Path, default=Path("/tmp/vllm-bench"))
    parser.add_argument("--vllm-bench-input-len", type=int, default=128)
    parser.add_argument(
        "--vllm-bench-min-prompts",
        type=int,
        default=32,
        help="prompts per run: this or 4 x concurrency, whichever is more",
    )
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--start-timeout-s", type=float, default=420)
    parser.add_argument("--deadline-s", type=float, default=560)
    parser.add_argument(
        "--level-timeout-s",
        type=float,
        default=150,
        help="one concurrency level of one client may take this long before it fails",
    )
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--variant", type=parse_variant, action="append", default=[])
    parser.add_argument(
        "--profile-s",
        type=float,
        default=0,
        help="after each server's levels, py-spy its processes this long under load",
    )
    parser.add_argument("--profile-concurrency", type=int, default=64)
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--append", action="store_true", help="add to --out's earlier rows")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_serve.json")
    args = parser.parse_args()
    started = time.monotonic()
    args.ends_at = started + args.deadline_s
    # The harness runs `ray` and `serve` from this prefix (a venv, or the GPU site dir).
    serve_cluster.SERVE_VENV = args.ray_prefix
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
    args.profiles = result.setdefault("profiles", {})

    def save() -> None:
        add_ratios(result["rows"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def add(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        save()

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
            run_ours(label, env, app, args, result, add)
            save()
            continue
        t0 = time.monotonic()
        try:
            proc, base = plain_vllm(args.model, args, args.log_dir / "vllm_server.log")
            result["startup_s"]["plain"] = round(time.monotonic() - t0, 1)
            try:
                bench_target(PLAIN, base, None, args, add)
            finally:
                stop_proc(proc)
        except Exception as exc:
            result["errors"]["plain"] = f"{type(exc).__name__}: {str(exc)[-2500:]}"
        save()
    save()
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
