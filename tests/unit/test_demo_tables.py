"""`make demo` prints only the table rows it measured."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nvfp4_admin.bench import render

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def _demo():  # scripts/ is not a package: load the script as a module
    spec = importlib.util.spec_from_file_location("demo_script", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(label: str, tok_s: float) -> dict:
    # As under Ray Serve: KV cache metrics, no API server RSS.
    return {
        "label": label,
        "checkpoint_bytes": 269_000_000,
        "metrics": {"kv_cache_tokens": 43_690},
        "levels": [
            {"concurrency": 1, "decode_tok_s_per_stream": tok_s, "ttft_p50_ms": 20.0},
            {"concurrency": 4, "throughput_tok_s": 3 * tok_s, "ttft_p50_ms": None},
        ],
    }


def test_rows_without_a_measured_value_are_left_out() -> None:
    full = render([_result("BF16", 28.7), _result("NVFP4", 9.1)], [1, 4])
    assert "| API server RSS (GB) | - | - | - |" in full
    shown = _demo().measured_only(full)
    assert "API server RSS" not in shown and "TTFT p50 ms, 4 stream(s)" not in shown
    assert "| KV cache capacity (tokens) | 43,690 | 43,690 | 1.00x |" in shown
    assert "| TTFT p50 ms, 1 stream(s) | 20 | 20 | 1.00x |" in shown
    assert shown.count("|---|---|---|---|") == 2  # both tables keep their header rows
