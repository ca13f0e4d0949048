"""The README.md model card written next to a quantized checkpoint."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

FORMAT_TEXT = {
    "nvfp4": (
        "NVFP4 weights and activations of the linear layers: E2M1 (4-bit float) values in"
        " blocks of 16, one FP8 E4M3 scale per block and one FP32 scale per tensor"
        " (4.5 bits per weight)."
    ),
    "nvfp4-fp8kv": (
        "NVFP4 weights and activations of the linear layers: E2M1 (4-bit float) values in"
        " blocks of 16, one FP8 E4M3 scale per block and one FP32 scale per tensor; the KV"
        " cache is FP8 E4M3 with per-tensor scales (k_scale, v_scale)."
    ),
    "fp8": (
        "FP8 E4M3 weights and activations of the linear layers with one FP32 scale per"
        " tensor (8 bits per weight)."
    ),
}


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.3f} GB"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render(report: dict[str, Any]) -> str:
    """Markdown for a report as written by the pipeline (report.json)."""
    fmt = report["format"]
    name = report["output_name"]
    calib = report["calibration"]
    ev = report["evaluation"]
    size = report["size"]
    versions = report["versions"]
    base = report["base_model"]
    # A local folder is named by its last part: the card must not leak worker paths.
    if base.startswith(("/", ".", "~")):
        base = PurePath(base).name
    excluded = ", ".join(f"`{m}`" for m in report["excluded_modules"]) or "none"
    # Reports written before the dtype was recorded say nothing about it.
    source_dtype = size.get("source_dtype")
    original = f"original ({source_dtype} safetensors)" if source_dtype else "original"
    werr = ev.get("weight_error") or {}
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        f"tags: [{fmt}, modelopt, quantized]",
        "---",
        "",
        f"# {name}",
        "",
        f"{fmt.upper()} quantization of `{base}` made with NVIDIA ModelOpt"
        f" {versions.get('modelopt', '?')} post-training quantization (max calibration).",
        "",
        "## Format",
        "",
        FORMAT_TEXT.get(fmt, fmt),
        "",
        f"- Quantized layers: {werr.get('layers', 'n/a')}",
        f"- Kept in BF16: {excluded}",
        f"- Checkpoint: `hf_quant_config.json` (quant_algo `{report['quant_algo']}`),"
        " `config.json` with `quantization_config` (`quant_method: modelopt`).",
        "",
        "## Calibration",
        "",
        f"- Data: {calib['data']}",
        f"- Samples: {calib['samples']} x {calib['seq_len']} tokens",
        f"- Device: {report['device']}",
        "",
        "## Memory",
        "",
        "| checkpoint | size |",
        "| --- | --- |",
        f"| {original} | {_gb(size['source_bytes'])} |",
        f"| {fmt} | {_gb(size['output_bytes'])} |",
        f"| reduction | {_num(size['reduction_pct'], '{:.1f}%')} |",
        "",
        "## Quality",
        "",
        f"Held-out perplexity on {ev.get('held_out_samples', 0)} x {calib['seq_len']} tokens"
        " of the calibration source not used for calibration (lower is better):",
        "",
        "| model | perplexity |",
        "| --- | --- |",
        f"| original | {_num(ev.get('perplexity_base'))} |",
        f"| {fmt} | {_num(ev.get('perplexity_quant'))} |",
        f"| change | {_num(ev.get('perplexity_change_pct'), '{:+.1f}%')} |",
        "",
        f"Mean relative weight reconstruction error: {_num(werr.get('mean'), '{:.4f}')}.",
        "",
        "## Tool versions",
        "",
        "| tool | version |",
        "| --- | --- |",
        *(f"| {tool} | {version} |" for tool, version in versions.items()),
        "",
        "## Serving",
        "",
        "With vLLM:",
        "",
        "```bash",
        f"vllm serve ./{name} --quantization modelopt",
        "```",
        "",
        "With nvfp4-stack (Ray Serve + vLLM):",
        "",
        "```bash",
        f"nvfp4ctl serve deploy --job {report['job_id']}",
        "```",
        "",
    ]
    return "\n".join(lines)
