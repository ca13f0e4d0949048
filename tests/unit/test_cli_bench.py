"""`nvfp4ctl bench`: the statistics, the metrics reading and the two tables.

The load itself runs against a real served model in the demo's end-to-end test; here the
numbers that feed the tables are given, so the arithmetic and the layout can be checked
exactly, and the command runs against a stand-in server (see _StandIn).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nvfp4_admin import engine_metrics
from nvfp4_admin.bench import render
from nvfp4_admin.cli import cli
from nvfp4_admin.loadgen import LevelStats, RequestStats, prompt_of, v1_url

# Captured from vLLM 0.32 (CPU build) and Ray 2.60, not written by hand: vLLM's
# PrometheusStatLogger and, inside a Ray actor, its RayPrometheusStatLogger (the logger
# Ray Serve LLM uses), each set up for a tiny Qwen3 with num_gpu_blocks=2048, then
# prometheus_client's text and Ray's metrics export port scraped. Only the lines of
# interest are kept. vLLM fills kv_cache_size_tokens once the engine has sized its cache;
# the first capture shows it unset ("None"), as vLLMs without that field leave it.
MODEL = "/tmp/cap/tiny-qwen3"
VLLM_METRICS = (
    "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
    "# TYPE process_resident_memory_bytes gauge\n"
    "process_resident_memory_bytes 6.39737856e+08\n"
    "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    'vllm:kv_cache_usage_perc{engine="0",model_name="/tmp/cap/tiny-qwen3"} 0.25\n'
    "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
    "# TYPE vllm:cache_config_info gauge\n"
    'vllm:cache_config_info{_block_size_resolved="True",block_size="128",'
    'cache_dtype="auto",cache_hit_alignment_tokens="None",'
    'effective_attention_block_size="None",enable_mamba_shared_prefix_checkpoint="False",'
    'enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.92",'
    'hash_block_size="None",is_attention_free="False",kv_cache_dtype_skip_layers="[]",'
    'kv_cache_layout="None",kv_cache_max_concurrency="None",'
    'kv_cache_memory_bytes="1073741824",kv_cache_size_tokens="None",'
    'kv_offloading_backend="native",kv_offloading_size="None",'
    'kv_sharing_fast_prefill="False",mamba_block_size="None",mamba_cache_dtype="auto",'
    'mamba_cache_mode="none",mamba_page_size_padded="None",mamba_ssm_cache_dtype="auto",'
    'num_cpu_blocks="None",num_gpu_blocks="2048",num_gpu_blocks_override="None",'
    'prefix_cache_retention_interval="0",prefix_caching_hash_algo="sha256",'
    'prefix_match_unit="None",replayssm_buffer_len="16",skip_page_size_padded="None",'
    'sliding_window="None",swa_bounded_replay="True",use_kda_recoverssm="False",'
    'use_replayssm="False",user_specified_block_size="False"} 1.0\n'
)

RAY_METRICS = (
    "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
    "# TYPE process_resident_memory_bytes gauge\n"
    "process_resident_memory_bytes 1.31846144e+08\n"
    "# HELP ray_vllm_kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
    "# TYPE ray_vllm_kv_cache_usage_perc gauge\n"
    'ray_vllm_kv_cache_usage_perc{Component="core_worker",NodeAddress="127.0.0.1",'
    'ReplicaId="",SessionName="session_2026-11-27_15-42-34_155329_18346",Version="2.60.0",'
    'WorkerId="8969217d8a8e66c2af5a07cded16a1b17bab35061cd1f4e06601bad6",engine="0",'
    'model_name="/tmp/cap/tiny-qwen3",'
    'otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",'
    'otel_scope_schema_url="",otel_scope_version=""} 0.25\n'
    "# HELP ray_vllm_cache_config_info Information of the LLMEngine CacheConfig\n"
    "# TYPE ray_vllm_cache_config_info gauge\n"
    'ray_vllm_cache_config_info{Component="core_worker",NodeAddress="127.0.0.1",'
    'ReplicaId="",SessionName="session_2026-11-27_15-42-34_155329_18346",Version="2.60.0",'
    'WorkerId="8969217d8a8e66c2af5a07cded16a1b17bab35061cd1f4e06601bad6",'
    '_block_size_resolved="True",block_size="128",cache_dtype="auto",'
    'cache_hit_alignment_tokens="None",effective_attention_block_size="None",'
    'enable_mamba_shared_prefix_checkpoint="False",enable_prefix_caching="True",engine="0",'
    'gpu_memory_utilization="0.92",hash_block_size="None",is_attention_free="False",'
    'kv_cache_dtype_skip_layers="[]",kv_cache_layout="None",'
    'kv_cache_max_concurrency="None",kv_cache_memory_bytes="1073741824",'
    'kv_cache_size_tokens="262144",kv_offloading_backend="native",'
    'kv_offloading_size="None",kv_sharing_fast_prefill="False",mamba_block_size="None",'
    'mamba_cache_dtype="auto",mamba_cache_mode="none",mamba_page_size_padded="None",'
    'mamba_ssm_cache_dtype="auto",num_cpu_blocks="None",num_gpu_blocks="2048",'
    'num_gpu_blocks_override="None",'
    'otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",'
    'otel_scope_schema_url="",otel_scope_version="",prefix_cache_retention_interval="0",'
    'prefix_caching_hash_algo="sha256",prefix_match_unit="None",replayssm_buffer_len="16",'
    'skip_page_size_padded="None",sliding_window="None",swa_bounded_replay="True",'
    'use_kda_recoverssm="False",use_replayssm="False",'
    'user_specified_block_size="False"} 1.0\n'
    'ray_component_rss_mb{Component="ray::Engine",'
    'SessionName="session_2026-11-27_15-42-34_155329_18346",Version="2.60.0",'
    'ip="127.0.0.1",'
    'otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",'
    'otel_scope_schema_url="",otel_scope_version="",pid=""} 695.1936\n'
)

# The same cluster with a second model's engine still exporting (another worker).
_OTHER_WORKER = RAY_METRICS.replace(
    "8969217d8a8e66c2af5a07cded16a1b17bab35061cd1f4e06601bad6", "f" * 56
)
OTHER_ENGINE = (
    "\n".join(
        line.replace(MODEL, "old-bf16").replace(
            'kv_cache_size_tokens="262144"', 'kv_cache_size_tokens="65536"'
        )
        for line in _OTHER_WORKER.splitlines()
        if line.startswith(("ray_vllm_cache_config_info", "ray_vllm_kv_cache_usage_perc"))
    )
    + "\n"
)


def test_parse_vllm_metrics() -> None:
    assert engine_metrics.parse(VLLM_METRICS, MODEL) == {
        "server_rss_bytes": 639737856,
        "engines": 1,
        "kv_cache_tokens": 2048 * 128,  # blocks x block size when vLLM gives no count
        "kv_cache_dtype": "auto",
        "gpu_memory_utilization": 0.92,
    }
    assert engine_metrics.parse("# nothing of vLLM here\nup 1\n") == {}


def test_parse_ray_metrics_of_one_model() -> None:
    got = engine_metrics.parse(RAY_METRICS, MODEL)
    # Ray's process_resident_memory_bytes is its metrics agent's: no server RSS here.
    assert got == {
        "engines": 1,
        "kv_cache_tokens": 262144,
        "kv_cache_dtype": "auto",
        "gpu_memory_utilization": 0.92,
    }
    both = RAY_METRICS + OTHER_ENGINE
    assert engine_metrics.parse(both, MODEL)["kv_cache_tokens"] == 262144
    assert engine_metrics.parse(both, "old-bf16")["kv_cache_tokens"] == 65536
    assert engine_metrics.parse(both, "not-served") == {}
    unknown = engine_metrics.parse(both)  # no model: two engines that disagree
    assert unknown["engines"] == 2 and unknown["kv_cache_tokens"] is None


def test_metrics_endpoint() -> None:
    assert engine_metrics.metrics_endpoint("http://h:8080") == "http://h:8080/metrics"
    assert engine_metrics.metrics_endpoint("http://h:8080/") == "http://h:8080/metrics"
    assert engine_metrics.metrics_endpoint("http://h:8000/metrics") == "http://h:8000/metrics"


def test_level_summary() -> None:
    level = LevelStats(concurrency=2, wall_s=2.0)
    level.requests = [RequestStats(ttft_s=0.1, total_s=1.1, tokens=101), RequestStats(0.3, 1.3, 51)]
    level.errors = ["RuntimeError: HTTP 503: busy"]
    s = level.summary()
    assert s["tokens"] == 152 and s["throughput_tok_s"] == 76.0
    assert s["decode_tok_s_per_stream"] == 75.0  # median of 100/1.0 and 50/1.0
    assert (s["ttft_p50_ms"], s["ttft_p90_ms"]) == (300.0, 300.0)
    assert s["errors"] == 1 and s["first_error"].startswith("RuntimeError")


def _result(label: str, scale: float, ckpt: int, kv: int) -> dict:
    return {
        "label": label,
        "checkpoint_bytes": ckpt,
        "metrics": {"kv_cache_tokens": kv},
        "levels": [
            {"concurrency": 1, "decode_tok_s_per_stream": 100.0 * scale, "ttft_p50_ms": 20.0},
            {"concurrency": 8, "throughput_tok_s": 700.0 * scale, "ttft_p50_ms": 40.0},
        ],
    }


def test_render_two_tables_with_ratio() -> None:
    text = render(
        [
            _result("BF16", 1.0, 16_380_000_000, 100_000),
            _result("NVFP4", 1.35, 6_400_000_000, 300_000),
        ],
        [1, 8],
    )
    assert "### Memory" in text and "### Speed" in text
    assert "| checkpoint size (GB) | 16.38 | 6.40 | 0.39x |" in text
    assert "| KV cache capacity (tokens) | 100,000 | 300,000 | 3.00x |" in text
    assert "| decode tok/s, 1 stream | 100.0 | 135.0 | 1.35x |" in text
    assert "| throughput tok/s, 8 streams | 700.0 | 945.0 | 1.35x |" in text
    assert "| TTFT p50 ms, 8 stream(s) | 40 | 40 | 1.00x |" in text
    single = render([_result("NVFP4", 1.0, 0, 0)], [1])
    assert "| checkpoint size (MB) | - |" in single and "x |" not in single


def test_urls_and_prompt() -> None:
    assert v1_url("http://h:8000") == v1_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert len(prompt_of(200).split()) == 200


def test_unreachable_endpoint_is_one_line() -> None:
    out = CliRunner().invoke(
        cli, ["bench", "--endpoint", "http://127.0.0.1:9", "--concurrency", "1"]
    )
    assert out.exit_code == 1
    assert out.output.splitlines()[-1].startswith(
        "Error: cannot reach http://127.0.0.1:9/v1/models"
    )


class _StandIn(BaseHTTPRequestHandler):
    """The three routes bench reads, shaped as vLLM answers them: /v1/models, streaming
    /v1/completions (text chunks, a usage chunk, [DONE]) and Ray's metrics text captured
    above. Starting vLLM and Ray takes minutes; the demo's end-to-end test does that."""

    completions = 0

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: str, ctype: str) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(json.dumps({"object": "list", "data": [{"id": MODEL}]}), "application/json")
        else:
            self._send(RAY_METRICS, "text/plain")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).completions += 1
        events = [{"choices": [{"index": 0, "text": f" t{i}"}]} for i in range(4)]
        events.append({"choices": [], "usage": {"completion_tokens": 4}})
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(body, "text/event-stream")


@pytest.fixture
def stand_in() -> Iterator[str]:
    _StandIn.completions = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bench_reads_kv_rows_from_the_metrics_url_and_always_writes_json(
    stand_in: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default --out is relative to the working folder
    args = ["bench", "--endpoint", stand_in, "--concurrency", "1", "--concurrency", "2"]
    out = CliRunner().invoke(cli, [*args, "--metrics-url", stand_in])
    assert out.exit_code == 0, out.output
    assert "| KV cache capacity (tokens) | 262,144 |" in out.output
    assert "| API server RSS (GB) | - |" in out.output  # Ray's agent RSS is not the server's
    (written,) = (tmp_path / "bench" / "results").glob("bench-*Z.json")
    doc = json.loads(written.read_text())
    assert doc["results"][0]["metrics"]["kv_cache_tokens"] == 262144
    assert doc["results"][0]["metrics_url"] == stand_in
    written.unlink()
    out = CliRunner().invoke(cli, args)  # no metrics URL: the KV rows say "-"
    assert out.exit_code == 0, out.output
    assert "| KV cache capacity (tokens) | - |" in out.output
    assert len(list((tmp_path / "bench" / "results").glob("bench-*Z.json"))) == 1


def test_unreachable_metrics_url_fails_before_the_load(stand_in: str) -> None:
    out = CliRunner().invoke(
        cli, ["bench", "--endpoint", stand_in, "--metrics-url", "http://127.0.0.1:9"]
    )
    assert out.exit_code == 1
    assert out.output.splitlines()[-1].startswith(
        "Error: cannot read metrics at http://127.0.0.1:9/metrics"
    )
    assert _StandIn.completions == 0
