"""What does our serving layer cost? A concurrency sweep of our endpoint (Ray Serve LLM +
API keys) against vLLM's own OpenAI server, same model, same machine, same run.

Each target is started alone, warmed up with one request, then driven with the same
streaming load (`nvfp4_admin.loadgen`): /v1/completions, a ~128-word prompt, --tokens
generated with `ignore_eos`, `c` requests in flight and max(16, 2c) requests per
level. Token counts come from the usage record (Ray packs several tokens per chunk), so
ITL is each stream's mean time per token after the first. Printed and written: tok/s,
TTFT p50/p95, ITL p50/p95 and the ratios ours/plain.

    .venv/bin/python bench/serve_overhead.py [--model DIR] [--concurrency 1 16 64 128]
        [--tokens 32] [--variant NAME=KEY=VALUE,KEY=VALUE ...] [--no-default]

A variant is another configuration of our endpoint, measured in the same run against the
same plain-vLLM baseline (ratios from different runs do not compare). Upper-case keys are
environment variables of the Ray cluster (e.g. RAY_SERVE_ENABLE_HA_PROXY=1); other keys
are build_app args, values read as JSON when they parse (first_chunk_now=false,
stream_batching_interval_ms=100). The default configuration runs as "ours" unless
--no-default.

Without --model, a tiny Qwen3 (2 layers) and its NVFP4 checkpoint are made with the
worker's quantization code: that measures serving overhead, not model speed.
Writes bench/results/serve_overhead.json and .md (--out to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from devkit.serve_cluster import SERVE_PYTHON, ServeCluster, free_port, make_test_models
from nvfp4_admin.loadgen import LoadGenerator

ROOT = Path(__file__).resolve().parents[1]

API_KEY = "bench-key"
NAME = "bench"
PLAIN = "vllm"
ENV_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


def parse_variant(text: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """`NAME=K=V,K=V` -> (name, cluster env, build_app args)."""
    name, _, spec = text.partition("=")
    if not name or name == PLAIN:
        raise argparse.ArgumentTypeError(f"variant needs a name other than {PLAIN!r}: {text!r}")
    env: dict[str, str] = {}
    app: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE in {text!r}, got {item!r}")
        if ENV_KEY.match(key):
            env[key] = value
        else:
            try:
                app[key] = json.loads(value)
            except json.JSONDecodeError:
                app[key] = value
    return name, env, app


def plain_vllm(model: Path, max_len: int, log_dir: Path) -> tuple[str, Callable[[], None]]:
    """Start `python -m vllm.entrypoints.openai.api_server`; (base URL, stopper)."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    log = open(log_dir / f"vllm-{port}.log", "wb")  # noqa: SIM115
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

    def stop() -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()

    base = f"http://127.0.0.1:{port}"
    try:
        wait_generates(base, None, time.monotonic() + 600, lambda: proc.poll() is None)
    except (RuntimeError, TimeoutError) as e:
        stop()
        raise RuntimeError(f"{e}; see {log.name}") from None
    return base, stop


def wait_generates(base: str, key: str | None, deadline: float, alive: Callable[[], bool]) -> None:
    """Until a 1-token completion succeeds: the same readiness test for every target."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": NAME, "prompt": "hi", "max_tokens": 1}
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited before it answered")
        try:
            r = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=30)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{base} did not answer a completion in time")


def split_builder(app: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """A variant's `import_path` (another app builder, e.g. devkit.direct_streaming) and
    the build_app args without it."""
    rest = dict(app)
    return rest.pop("import_path", None), rest


class GeneratingCluster(ServeCluster):
    """ServeCluster that is ready when it generates (configs without /readyz count too)."""

    def wait_ready(self, deadline: float) -> None:
        wait_generates(self.base_url, API_KEY, deadline, lambda: True)


def ours(
    model: Path, args: argparse.Namespace, env: dict[str, str], app: dict[str, Any]
) -> tuple[str, Callable[[], None]]:
    """Start a private Ray cluster serving build_app; (base URL, stopper)."""
    builder, app = split_builder(app)
    cluster = GeneratingCluster(
        import_path=builder or ServeCluster.import_path,
        app_args={
            "model": str(model),
            "model_name": NAME,
            "accelerator": "cpu",
            "max_model_len": args.max_len,
            "engine_kwargs": {"enforce_eager": True},
            **app,
        },
        env={"NVFP4_SERVE_API_KEYS": json.dumps([API_KEY]), **env},
    ).start(timeout_s=600)
    return cluster.base_url, cluster.stop


def sweep(base: str, key: str | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    gen = LoadGenerator(base, NAME, key, args.prompt_words, args.tokens, timeout_s=600)

    async def go() -> list[dict[str, Any]]:
        await gen.level(1)  # warm-up: first-request costs are not the serving layer's
        rows = []
        for c in args.concurrency:
            n = args.requests or max(16, 2 * c)
            row = (await gen.level(c, n)).summary()
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows

    return asyncio.run(go())


Starter = Callable[[], tuple[str, Callable[[], None]]]


def run_target(label: str, start: Starter, key: str | None, args: argparse.Namespace) -> dict:
    print(f"== {label}: starting", flush=True)
    t0 = time.monotonic()
    base, stop = start()
    startup = round(time.monotonic() - t0, 1)
    try:
        return {"target": label, "startup_s": startup, "levels": sweep(base, key, args)}
    finally:
        stop()


def ratios(plain: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p, o in zip(plain["levels"], other["levels"], strict=True):
        out.append(
            {
                "concurrency": p["concurrency"],
                "throughput_ratio": round(o["throughput_tok_s"] / p["throughput_tok_s"], 3)
                if o["throughput_tok_s"] and p["throughput_tok_s"]
                else None,
                "extra_ttft_p50_ms": round(o["ttft_p50_ms"] - p["ttft_p50_ms"], 1)
                if o["ttft_p50_ms"] is not None and p["ttft_p50_ms"] is not None
                else None,
            }
        )
    return out


def table(targets: list[dict[str, Any]]) -> str:
    plain = targets[0]
    out = [
        "| conc | target | tok/s | ratio | TTFT p50 ms | +ms | TTFT p95 ms | ITL p50 ms"
        " | ITL p95 ms | requests | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, level in enumerate(plain["levels"]):
        for t in targets:
            row = t["levels"][i]
            r = ratios(plain, t)[i] if t is not plain else None
            ratio = f"{r['throughput_ratio']:.2f}x" if r and r["throughput_ratio"] else "-"
            extra = (
                f"{r['extra_ttft_p50_ms']:+.0f}"
                if r and r["extra_ttft_p50_ms"] is not None
                else "-"
            )
            out.append(
                f"| {level['concurrency']} | {t['target']} | {row['throughput_tok_s']} | {ratio}"
                f" | {row['ttft_p50_ms']} | {extra} | {row['ttft_p95_ms']} | {row['itl_p50_ms']}"
                f" | {row['itl_p95_ms']} | {row['requests']} | {row['errors']} |"
            )
    return "\n".join(out)


def versions() -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({d: m.version(d) for d in ('ray', 'vllm-cpu')}))"
    )
    out = subprocess.run([str(SERVE_PYTHON), "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: a tiny NVFP4 Qwen3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--requests", type=int, help="requests per level (max(16, 2c))")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE,...",
        help="another configuration of ours",
    )
    parser.add_argument("--no-default", action="store_true", help="skip the default config")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_overhead.json")
    args = parser.parse_args()

    if args.model is None:
        _, args.model = make_test_models(Path(tempfile.mkdtemp(prefix="bench-models-")))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    configs = ([] if args.no_default else [("ours", {}, {})]) + args.variant
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": str(args.model),
        "versions": versions(),
        "cpu_count": os.cpu_count(),
        "settings": {
            "concurrency": args.concurrency,
            "tokens": args.tokens,
            "prompt_words": args.prompt_words,
            "requests": args.requests or "max(16, 2c)",
        },
        "variants": {name: {"env": env, "args": app} for name, env, app in configs},
        "targets": {"throughput_ratio": ">= 0.97", "extra_ttft_p50_ms": "<= 5"},
        "results": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    result["results"].append(
        run_target(PLAIN, lambda: plain_vllm(args.model, args.max_len, log_dir), None, args)
    )
    save()
    for name, env, app in configs:
        try:
            start = lambda e=env, a=app: ours(args.model, args, e, a)  # noqa: E731
            target = run_target(name, start, API_KEY, args)
        except Exception as e:  # recorded; the other variants still run
            print(f"== {name}: failed: {e}", flush=True)
            result.setdefault("failed", {})[name] = f"{type(e).__name__}: {str(e)[-1500:]}"
            continue
        target["ratios"] = ratios(result["results"][0], target)
        result["results"].append(target)
        save()
    md = table(result["results"])
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
