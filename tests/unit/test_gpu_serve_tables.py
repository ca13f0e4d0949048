"""bench/gpu_serve.py's `vllm bench serve` figures: parsing a saved result, ratios, table.

The sample is a `vllm bench serve --save-result` file as vLLM 0.26 writes it (keys from
vllm/benchmarks/serve.py; see bench/devkit/vllm_bench.py), figures of an H100-sized run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gpu_serve
import gpu_tables
import pytest

from devkit import vllm_bench

SAMPLE = json.loads((Path(__file__).parent / "data" / "vllm_bench_serve_result.json").read_text())


def test_parse_reads_the_saved_figures() -> None:
    row = vllm_bench.parse(SAMPLE)
    assert row["tok_s"] == 7411.4 and row["ttft_p50_ms"] == 58.9 and row["ttft_p99_ms"] == 161.9
    assert (row["itl_p50_ms"], row["itl_p99_ms"], row["tpot_p50_ms"]) == (7.7, 16.9, 8.0)
    assert (row["completed"], row["failed"], row["concurrency"], row["prompts"]) == (
        256,
        0,
        64,
        256,
    )


def test_parse_leaves_missing_figures_empty() -> None:
    row = vllm_bench.parse({"output_throughput": 10.0, "max_concurrency": 1})
    assert row["tok_s"] == 10.0 and row["ttft_p99_ms"] is None and row["concurrency"] == 1


def test_command_sends_the_documented_load(tmp_path: Path) -> None:
    cmd = vllm_bench.command("/tmp/site/bin/vllm", "http://h:8000", "bench", Path("/m"), 16,
                             64, tmp_path, "x.json")  # fmt: skip
    joined = " ".join(cmd)
    assert cmd[:3] == ["/tmp/site/bin/vllm", "bench", "serve"]
    for part in ("--backend openai", "--endpoint /v1/completions", "--dataset-name random",
                 "--random-input-len 128", "--random-output-len 128", "--ignore-eos",
                 "--max-concurrency 16", "--num-prompts 64", "--save-result",
                 f"--result-dir {tmp_path}", "--served-model-name bench",
                 "--model /m"):  # fmt: skip
        assert part in joined


def _row(target: str, conc: int, tok_s: float, ttft: float, vllm_tok_s: float) -> dict:
    bench = vllm_bench.parse({**SAMPLE, "output_throughput": vllm_tok_s, "max_concurrency": conc})
    return {
        "target": target,
        "concurrency": conc,
        "requests": 4 * conc,
        "tokens_per_request": 128,
        "tok_s": tok_s,
        "ttft_p50_ms": ttft,
        "ttft_p95_ms": ttft * 2,
        "per_request_tok_s": 120.0,
        "vllm_bench": bench,
    }


def test_ratios_and_table_show_both_clients() -> None:
    rows = [
        _row(gpu_serve.PLAIN, 64, 7977.0, 60.0, 7411.4),
        _row("ours (Ray Serve build_app)", 64, 6621.0, 245.0, 6300.0),
        {**_row("ours: x", 128, 1.0, 1.0, 1.0), "vllm_bench": {"error": "RuntimeError: boom"}},
    ]
    gpu_serve.add_ratios(rows)
    assert rows[1]["tok_s_ratio"] == 0.83 and rows[1]["vllm_bench"]["tok_s_ratio"] == 0.85
    assert rows[1]["vllm_bench"]["extra_ttft_p50_ms"] == 0.0
    table = gpu_tables.serve_table({"rows": rows})
    header = table.splitlines()[0]
    assert "vllm bench tok/s (vs plain)" in header and "vllm bench TTFT p99 ms" in header
    assert "| 6300.0 (0.85x) | 58.9 | +0.0 | 161.9 |" in table
    assert "vllm bench, ours: x at 128: `RuntimeError: boom`" in table
    widths = {line.count("|") for line in table.splitlines() if line.startswith("|")}
    assert len(widths) == 1  # every row has as many cells as the header


def test_table_without_vllm_bench_keeps_its_columns() -> None:
    row = _row(gpu_serve.PLAIN, 1, 150.0, 12.0, 1.0)
    del row["vllm_bench"]
    assert "vllm bench" not in gpu_tables.serve_table({"rows": [row]})


def test_a_level_that_cannot_end_before_the_deadline_is_not_started() -> None:
    """The call then ends with the rows measured so far, instead of being stopped mid-level
    (the server at this address is never asked)."""
    args = argparse.Namespace(concurrency=[16, 64], ends_at=time.monotonic() + 10)
    rows: list[dict] = []
    with pytest.raises(TimeoutError, match="from 16 streams on"):
        gpu_serve.bench_target("ours", "http://127.0.0.1:9", None, args, rows.append)
    assert rows == []
