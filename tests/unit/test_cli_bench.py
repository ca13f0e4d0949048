"""`nvfp4ctl bench`: the statistics, the /metrics reading and the two tables.

The load itself runs against a real served model in the serving tests; here the numbers
that feed the tables are given, so the arithmetic and the layout can be checked exactly.
"""

from __future__ import annotations

from click.testing import CliRunner

from nvfp4_admin.bench import render
from nvfp4_admin.cli import cli
from nvfp4_admin.loadgen import LevelStats, RequestStats, parse_metrics, prompt_of, root_url, v1_url

# As vLLM 0.32 prints it (prometheus text format), plus the process collector's RSS.
_LABELS = (
    'block_size="16",cache_dtype="auto",engine="0",gpu_memory_utilization="0.9",'
    'num_gpu_blocks="2048",prefix_caching_hash_algo="sha256"'
)
METRICS = f"""\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{{_LABELS}}} 1.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
process_resident_memory_bytes 1.234567168e+09
vllm:num_requests_running{{engine="0",model_name="m"}} 0.0
"""


def test_parse_metrics() -> None:
    assert parse_metrics(METRICS) == {
        "kv_cache_tokens": 2048 * 16,
        "kv_cache_dtype": "auto",
        "gpu_memory_utilization": 0.9,
        "server_rss_bytes": 1234567168,
    }
    assert parse_metrics("# nothing of vLLM here\n") == {}


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
    assert root_url("http://h:8000/v1") == "http://h:8000"
    assert len(prompt_of(200).split()) == 200


def test_unreachable_endpoint_is_one_line() -> None:
    out = CliRunner().invoke(
        cli, ["bench", "--endpoint", "http://127.0.0.1:9", "--concurrency", "1"]
    )
    assert out.exit_code == 1
    assert out.output.splitlines()[-1].startswith(
        "Error: cannot reach http://127.0.0.1:9/v1/models"
    )
