"""`vllm bench serve`, vLLM's own load generator, run against an endpoint; its saved result
read into the few figures our tables show beside our client's (nvfp4_admin.loadgen).

Field names checked in vLLM's source, vllm/benchmarks/serve.py (vllm-project/vllm, main
at 009e6d4a, the same names as in the 0.26 release): `benchmark()` returns `duration`,
`completed`, `failed`, `total_output_tokens`, `request_throughput`, `output_throughput`,
and `process_one_metric` adds `mean_/median_/std_{ttft,tpot,itl,e2el}_ms` plus one
`p{N}_{metric}_ms` per `--metric-percentiles` (default "99"); `main()` adds
`max_concurrency` and `num_prompts` before `--save-result` writes the JSON.

vLLM's TTFT runs from just before its request is sent to the first chunk with generated
text, the same definition as ours; its output tok/s is all generated tokens over the run's
wall time, which includes the ramp-up of its first `max_concurrency` requests.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

# Our row key -> the saved result's key.
FIELDS = {
    "tok_s": "output_throughput",
    "ttft_p50_ms": "median_ttft_ms",
    "ttft_p99_ms": "p99_ttft_ms",
    "tpot_p50_ms": "median_tpot_ms",
    "itl_p50_ms": "median_itl_ms",
    "itl_p99_ms": "p99_itl_ms",
    "completed": "completed",
    "failed": "failed",
    "duration_s": "duration",
}


def command(
    vllm: str,
    base_url: str,
    served_name: str,
    tokenizer: Path,
    concurrency: int,
    prompts: int,
    result_dir: Path,
    result_file: str,
    input_len: int = 128,
    output_len: int = 128,
) -> list[str]:
    """The `vllm bench serve` command line: random prompts, fixed lengths, `ignore_eos`."""
    return [
        vllm, "bench", "serve",
        "--backend", "openai",
        "--base-url", base_url,
        "--endpoint", "/v1/completions",
        "--model", str(tokenizer),
        "--served-model-name", served_name,
        "--dataset-name", "random",
        "--random-input-len", str(input_len),
        "--random-output-len", str(output_len),
        "--ignore-eos",
        "--max-concurrency", str(concurrency),
        "--num-prompts", str(prompts),
        "--save-result",
        "--result-dir", str(result_dir),
        "--result-filename", result_file,
    ]  # fmt: skip


def run(cmd: list[str], api_key: str | None, result: Path, timeout_s: float) -> dict[str, Any]:
    """Run `cmd` (from `command`) and parse what it saved at `result`.

    vLLM sends `Authorization: Bearer $OPENAI_API_KEY`, so the key travels in that variable.
    """
    env = dict(os.environ)
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0 or not result.exists():
        tail = (out.stdout + out.stderr)[-1500:]
        raise RuntimeError(f"vllm bench serve exited {out.returncode}: {tail}")
    return parse(json.loads(result.read_text()))


def parse(saved: dict[str, Any]) -> dict[str, Any]:
    """The figures of one saved `vllm bench serve` result, rounded; absent ones are None."""
    row: dict[str, Any] = {}
    for ours, theirs in FIELDS.items():
        value = saved.get(theirs)
        row[ours] = round(value, 1) if isinstance(value, float) else value
    row["concurrency"] = saved.get("max_concurrency")
    row["prompts"] = saved.get("num_prompts")
    return row
