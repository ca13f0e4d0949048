"""The README.md model card written next to a quantized checkpoint.

The metadata goes through huggingface_hub's ModelCardData, so it is valid YAML whatever
the names in it, and carries what the Hub's checks look for (`base_model`,
`base_model_relation: quantized`).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from nvfp4_common.recipes import RECIPES

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


# What a report's sensitivity figures are: [whole model, layer by layer].
SENSITIVITY = (
    "KL with only that layer quantized",
    "relative change of that layer's output when it alone is quantized, measured layer by layer",
)


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
    recipe = RECIPES.get(report.get("recipe") or "")
    method = f"recipe `{recipe.name}`: {recipe.summary}" if recipe else "max calibration"
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[fmt, "modelopt", "quantized", "nvfp4-stack"],
    )
    lines = [
        f"# {name}",
        "",
        f"{fmt.upper()} quantization of `{base}` made with NVIDIA ModelOpt"
        f" {versions.get('modelopt', '?')} post-training quantization ({method}).",
        "",
        "## Format",
        "",
        FORMAT_TEXT.get(fmt, fmt),
        "",
        f"- Quantized layers: {werr.get('layers', 'n/a')}",
        f"- Kept in BF16: {excluded}",
        *_kept_line(report),
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
        f"Mean per-token KL divergence from the original's next-token distribution:"
        f" {_num(ev.get('kl'), '{:.4f}')} nats.",
        "",
        *_search(report),
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
        *_served(report.get("served") or {}),
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
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _served(served: dict[str, Any]) -> list[str]:
    """What vLLM did with this checkpoint when the worker measured it (served_speed.py)."""
    if "decode_tok_s" not in served:
        return []
    return [
        f"Measured by the worker with {served['engine']} on {served['device']}, generating"
        f" {served['tokens']} tokens a request: {served['decode_tok_s']:g} tok/s decoding one"
        f" stream, {served['throughput_tok_s']:g} tok/s with {served['streams']} streams.",
        "",
    ]


def _kept_line(report: dict[str, Any]) -> list[str]:
    """The decoder layers the search kept in FP8 (a MIXED_PRECISION checkpoint)."""
    kept = report.get("kept_layers") or []
    if report.get("kept_as") != "fp8" or not kept:
        return []
    return [
        f"- Kept in FP8 (E4M3 weights and activations, one FP32 scale per tensor): the linear"
        f" layers of {len(kept)} decoder layers, by measured sensitivity (below)"
    ]


def _kept(c: dict[str, Any]) -> str:
    n = len(c["kept"])
    return f"{n} in {c.get('kept_as', 'bf16').upper()}" if n else "0"


def _search(report: dict[str, Any]) -> list[str]:
    """The quality-target search: every candidate, and the layers kept in higher precision."""
    search = report.get("search") or {}
    candidates = search.get("candidates") or []
    if not search.get("target") or not candidates:
        return []
    sens = search.get("sensitivity") or {}
    out = [
        "## Quality target search",
        "",
        f"Target: {', '.join(f'{k} {v:g}' for k, v in search['target'].items())}."
        " Candidates measured on the held-out text, in the order tried:",
        "",
        "| recipe | layers kept | size | perplexity | KL | seconds | keeps target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in candidates:
        out.append(
            f"| {c['recipe']} | {_kept(c)} | {_gb(c['size_bytes'])} |"
            f" {_num(c['ppl_change_pct'], '{:+.1f}%')} | {_num(c['kl'], '{:.4f}')} |"
            f" {c['wall_s']:.0f} | {'yes' if c['meets'] else 'no'} |"
        )
    kept = report.get("kept_layers") or []
    if kept:
        out += [
            "",
            f"Kept in {(report.get('kept_as') or 'bf16').upper()} by measured sensitivity"
            f" ({SENSITIVITY[report.get('mode') == 'layerwise']}):",
            "",
            *(f"- `{k}`: {_num(sens.get(k), '{:.4f}')}" for k in kept),
        ]
    return [*out, ""]
