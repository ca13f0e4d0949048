"""What does our serving layer cost? Our endpoint (Ray Serve LLM + API keys) against
vLLM's own OpenAI server on the same model and machine; plus BF16 against NVFP4.

Streaming /v1/completions with a fixed prompt and `ignore_eos`, at concurrency 1 and
16: output tok/s, TTFT p50/p95 and mean inter-token latency (ITL). Token counts
come from the server's usage record, since Ray Serve may pack several tokens into
one streamed chunk. One server runs at a time.

    .venv/bin/python bench/serve_overhead.py [--model DIR] [--tokens 32] [--requests 16]

Without --model, a tiny Qwen3 (2 layers) and its NVFP4 checkpoint are made with the
worker's quantization code: that measures serving overhead, not model speed.
Writes bench/results/serve_overhead.json and .md.
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
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serve_harness import (  # noqa: E402
    SERVE_PYTHON,
    ServeCluster,
    free_port,
    make_test_models,
)

API_KEY = "bench-key"
NAME = "bench"
PROMPT = "The history of the city begins with a small settlement by the river, and"


async def one_request(client: httpx.AsyncClient, url: str, tokens: int) -> dict[str, float]:
    body = {
        "model": NAME,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    n_out = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or now
                last = now
            if chunk.get("usage"):
                n_out = chunk["usage"]["completion_tokens"]
    assert first is not None and last is not None and n_out == tokens, (n_out, tokens)
    return {
        "ttft_s": first - start,
        "itl_s": (last - first) / max(n_out - 1, 1),
        "tokens": n_out,
        "end": last,
        "start": start,
    }


async def load(base: str, key: str | None, conc: int, requests: int, tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{base}/v1/completions"
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        for _ in range(2):  # warm-up
            await one_request(client, url, 4)
        queue = list(range(requests))
        results: list[dict[str, float]] = []

        async def worker() -> None:
            while queue:
                queue.pop()
                results.append(await one_request(client, url, tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in results)
    return {
        "concurrency": conc,
        "requests": len(results),
        "tok_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
        "ttft_p95_ms": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] * 1000, 1),
        "itl_ms": round(statistics.mean(r["itl_s"] for r in results) * 1000, 2),
    }


def plain_vllm(model: Path, max_len: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    log = open(Path(tempfile.gettempdir()) / f"vllm-bench-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(SERVE_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            str(max_len),
            "--enforce-eager",
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited; see {log.name}")
        try:
            body = {"model": NAME, "prompt": "hi", "max_tokens": 1}
            if httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("vLLM did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_target(label: str, model: Path, ray: bool, args: argparse.Namespace) -> list[dict]:
    print(f"== {label}: starting", flush=True)
    t0 = time.monotonic()
    if ray:
        cluster = ServeCluster(
            app_args={
                "model": str(model),
                "model_name": NAME,
                "accelerator": "cpu",
                "max_model_len": args.max_len,
                "engine_kwargs": {"enforce_eager": True},
            },
            env={"NVFP4_SERVE_API_KEYS": json.dumps([API_KEY])},
        ).start(timeout_s=600)
        base, key, stopper = cluster.base_url, API_KEY, cluster.stop
    else:
        proc, base = plain_vllm(model, args.max_len)
        key, stopper = None, lambda: stop(proc)
    started = round(time.monotonic() - t0, 1)
    try:
        rows = []
        for conc in (1, 16):
            n = args.requests if conc == 1 else max(args.requests, 2 * conc)
            row = asyncio.run(load(base, key, conc, n, args.tokens))
            row.update(target=label, startup_s=started)
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        stopper()


def table(rows: list[dict]) -> str:
    out = [
        "| target | conc | tok/s | TTFT p50 ms | TTFT p95 ms | ITL ms | start s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['target']} | {r['concurrency']} | {r['tok_s']} | {r['ttft_p50_ms']} | "
            f"{r['ttft_p95_ms']} | {r['itl_ms']} | {r['startup_s']} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="NVFP4 checkpoint (default: tiny Qwen3)")
    parser.add_argument("--bf16", type=Path, help="the same model in BF16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_overhead.json")
    args = parser.parse_args()

    if args.model is None:
        args.bf16, args.model = make_test_models(Path(tempfile.mkdtemp(prefix="bench-models-")))
    rows = run_target("vllm-nvfp4", args.model, ray=False, args=args)
    rows += run_target("ours-nvfp4", args.model, ray=True, args=args)
    if args.bf16:
        rows += run_target("vllm-bf16", args.bf16, ray=False, args=args)

    by = {(r["target"], r["concurrency"]): r for r in rows}
    ratios: dict[str, Any] = {}
    for conc in (1, 16):
        plain, ours = by[("vllm-nvfp4", conc)], by[("ours-nvfp4", conc)]
        ratios[f"c{conc}"] = {
            "throughput_ratio": round(ours["tok_s"] / plain["tok_s"], 3),
            "extra_ttft_p50_ms": round(ours["ttft_p50_ms"] - plain["ttft_p50_ms"], 1),
        }
        if ("vllm-bf16", conc) in by:
            ratios[f"c{conc}"]["nvfp4_over_bf16_tok_s"] = round(
                plain["tok_s"] / by[("vllm-bf16", conc)]["tok_s"], 3
            )
    result = {
        "model": str(args.model),
        "bf16": str(args.bf16) if args.bf16 else None,
        "tokens": args.tokens,
        "prompt": PROMPT,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "targets": {"throughput_ratio": ">= 0.97", "extra_ttft_p50_ms": "<= 5"},
        "rows": rows,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = table(rows) + "\n\n" + "\n".join(f"- {k}: {json.dumps(v)}" for k, v in ratios.items())
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
