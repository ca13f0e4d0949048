"""The README.md model card rendered from a report.json."""

from __future__ import annotations

import copy
from typing import Any

from nvfp4_worker import modelcard

REPORT: dict[str, Any] = {
    "job_id": "job-1",
    "output_name": "m-NVFP4",
    "base_model": "/models/src/m",
    "format": "nvfp4",
    "quant_algo": "NVFP4",
    "excluded_modules": ["lm_head", "model.layers.0.mlp.down_proj"],
    "device": "cuda",
    "calibration": {"data": "allenai/c4", "samples": 512, "seq_len": 2048, "tokens": 1048576},
    "evaluation": {
        "held_out_samples": 32,
        "perplexity_base": 10.0,
        "perplexity_quant": 10.5,
        "perplexity_change_pct": 5.0,
        "weight_error": {"layers": 195, "mean": 0.0951},
    },
    "size": {
        "source_bytes": 16_380_000_000,
        "source_dtype": "FP16",
        "output_bytes": 6_400_000_000,
        "reduction_pct": 60.93,
    },
    "versions": {"python": "3.12.3", "modelopt": "0.47.0", "torch": "2.9.0"},
}


def test_card_names_the_real_source_dtype() -> None:
    card = modelcard.render(REPORT)
    assert "| original (FP16 safetensors) | 16.380 GB |" in card
    assert "BF16 safetensors" not in card
    # A local source folder is named by its last part only.
    assert "base_model: m\n" in card and "/models/src" not in card


def test_card_without_a_recorded_dtype_claims_none() -> None:
    old = copy.deepcopy(REPORT)
    del old["size"]["source_dtype"]  # report.json written before the dtype was recorded
    card = modelcard.render(old)
    assert "| original | 16.380 GB |" in card


def test_card_tables() -> None:
    card = modelcard.render(REPORT)
    for line in (
        "| nvfp4 | 6.400 GB |",
        "| reduction | 60.9% |",
        "| original | 10.00 |",
        "| nvfp4 | 10.50 |",
        "| change | +5.0% |",
        "- Data: allenai/c4",
        "- Samples: 512 x 2048 tokens",
        "- Kept in BF16: `lm_head`, `model.layers.0.mlp.down_proj`",
        "| modelopt | 0.47.0 |",
        "Mean relative weight reconstruction error: 0.0951.",
    ):
        assert line in card, line


def test_card_carries_vllm_speed_only_when_measured() -> None:
    measured = copy.deepcopy(REPORT)
    measured["served"] = {
        "engine": "vLLM 0.26.0",
        "device": "NVIDIA H100 80GB HBM3",
        "tokens": 128,
        "decode_tok_s": 151.2,
        "streams": 8,
        "throughput_tok_s": 1130.5,
    }
    card = modelcard.render(measured)
    assert (
        "Measured by the worker with vLLM 0.26.0 on NVIDIA H100 80GB HBM3, generating 128"
        " tokens a request: 151.2 tok/s decoding one stream, 1130.5 tok/s with 8 streams."
    ) in card
    for served in ({"skipped": "no Python with vLLM"}, {"error": "vLLM exited 1: boom"}):
        assert "Measured by the worker" not in modelcard.render({**REPORT, "served": served})
