"""`nvfp4ctl estimate MODEL`: predicted sizes and memory fit from config.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nvfp4_admin.context import format_option, json_option
from nvfp4_admin.output import emit_json, human_bytes, table
from nvfp4_admin.sizing import checkpoint_sizes, machine_fits, memory_fit, read_config
from nvfp4_common.sizing import GIB, gib


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@format_option("Format to check the memory fit for.")
@click.option(
    "--exclude", multiple=True, metavar="PATTERN", help="Module glob kept in BF16 (repeatable)."
)
@click.option(
    "--memory-gb",
    type=click.FloatRange(1),
    default=128.0,
    show_default=True,
    help="Memory of the machine in GB (10^9 bytes, as spec sheets give it; a DGX Spark:"
    " 128 GB = 119.2 GiB, shared by CPU and GPU).",
)
@click.option(
    "--reserve-gb",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="GB (10^9 bytes) left to the OS and other processes.",
)
@click.option(
    "--calib-samples",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Calibration samples, for the layer-by-layer peak (a job's default).",
)
@click.option(
    "--calib-seq-len",
    type=click.IntRange(1),
    default=2048,
    show_default=True,
    help="Tokens per calibration sample, for the layer-by-layer peak (a job's default).",
)
@json_option
def estimate(
    model: Path,
    fmt: str,
    exclude: tuple[str, ...],
    memory_gb: float,
    reserve_gb: float,
    calib_samples: int,
    calib_seq_len: int,
    as_json: bool,
) -> None:
    """Predict checkpoint sizes, KV cache per token and whether MODEL fits in memory.

    MODEL is a model folder or a bare config.json; no weights are read. Embeddings,
    lm_head, norms, MoE routers and --exclude'd modules stay BF16; NVFP4 stores 4.5 bits
    per weight (a 4-bit value plus one FP8 scale per 16 values).
    """
    config, shape = read_config(model / "config.json" if model.is_dir() else model)
    sizes = checkpoint_sizes(shape, exclude)
    # Options take GB as machines are sold; every size below is in GiB.
    memory_gib, reserve_gib = memory_gb * 1e9 / GIB, reserve_gb * 1e9 / GIB
    calib = (calib_samples, calib_seq_len)
    fit = memory_fit(shape, sizes, fmt, memory_gib, reserve_gib, calib)
    machines = machine_fits(shape, calib)
    on_disk = _weights_on_disk(model) if model.is_dir() else None
    report: dict[str, Any] = {
        "model": str(model),
        "model_type": shape.model_type,
        "params": sizes.params,
        "bf16_bytes": sizes.bf16_bytes,
        "nvfp4_bytes": sizes.quant_bytes["nvfp4"],
        "fp8_bytes": sizes.quant_bytes["fp8"],
        "bf16_kept_params": sizes.bf16_kept_params,
        "excluded_modules": len(sizes.excluded_modules),
        "kv_bytes_per_token": {
            "bf16": shape.kv_bytes_per_token(2),
            "fp8": shape.kv_bytes_per_token(1),
        },
        "weights_on_disk_bytes": on_disk,
        "already_quantized": bool(config.get("quantization_config")),
        "fit": fit.__dict__,
        "machines": [m.__dict__ for m in machines],
    }
    if as_json:
        emit_json(report)
        return
    click.echo(
        f"{config.get('architectures', [shape.model_type])[0]}: {sizes.params / 1e9:.2f} B"
        f" parameters, {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads"
        f" ({shape.kv_heads} KV), head_dim {shape.head_dim}"
        + (f", {shape.experts} experts" if shape.experts else "")
        + (", tied embeddings" if shape.tied else "")
    )
    if report["already_quantized"]:
        click.echo("note: this config already carries a quantization_config")
    rows = [
        ("BF16", gib(sizes.bf16_bytes), "1.00x"),
        (
            "NVFP4",
            gib(sizes.quant_bytes["nvfp4"]),
            f"{sizes.quant_bytes['nvfp4'] / sizes.bf16_bytes:.2f}x",
        ),
        (
            "FP8",
            gib(sizes.quant_bytes["fp8"]),
            f"{sizes.quant_bytes['fp8'] / sizes.bf16_bytes:.2f}x",
        ),
    ]
    click.echo(table(("checkpoint", "size", "vs bf16"), rows))
    if on_disk:
        click.echo(f"weights on disk now: {gib(on_disk)}")
    click.echo(
        f"kept in BF16: {sizes.bf16_kept_params / 1e9:.2f} B parameters"
        f" ({len(sizes.excluded_modules)} excluded linear modules incl. lm_head)"
    )
    click.echo(
        f"KV cache per token: {human_bytes(report['kv_bytes_per_token']['bf16'])} BF16,"
        f" {human_bytes(report['kv_bytes_per_token']['fp8'])} FP8"
    )
    click.echo(
        f"\nin {memory_gb:g} GB = {memory_gib:.1f} GiB ({reserve_gib:.1f} GiB left to the"
        f" system), format {fmt}:"
    )
    verdict = "fits" if fit.quantize_fits else "DOES NOT FIT"
    click.echo(
        f"  quantize: peak ~{fit.quantize_peak_gib:.1f} GiB"
        f" (BF16 model x 1.5 + 2 GiB, the worker's memory check) -> {verdict}"
    )
    how = "activations spilled to disk" if fit.layerwise_spills else "activations in memory"
    click.echo(
        f"  quantize layer by layer: peak ~{fit.layerwise_peak_gib:.1f} GiB (one layer,"
        f" {calib_samples} x {calib_seq_len} calibration tokens, {how})"
        f" -> {'fits' if fit.layerwise_fits else 'DOES NOT FIT'}"
    )
    click.echo(
        f"  serve: weights {fit.weights_gib:.1f} GiB; gpu_memory_utilization"
        f" {fit.gpu_memory_utilization:.2f} leaves {fit.kv_budget_gib:.1f} GiB of KV cache"
        f" = {fit.kv_tokens:,} tokens -> {'fits' if fit.serve_fits else 'DOES NOT FIT'}"
    )
    if fit.max_model_len:
        click.echo(
            f"  suggested: --gpu-memory-utilization {fit.gpu_memory_utilization:.2f}"
            f" --max-model-len {fit.max_model_len}"
            f" ({fit.concurrent_sequences} full-length sequence(s) at once;"
            f" model limit {shape.max_positions or 'unknown'})"
        )

    machine_rows = [
        (
            m.machine,
            f"{m.room_gib:.1f} GiB",
            f"{m.whole_model_gib:.1f} GiB {'yes' if m.whole_model_fits else 'no'}",
            f"{m.layerwise_gib:.1f} GiB {'yes' if m.layerwise_fits else 'no'}",
        )
        for m in machines
    ]
    click.echo(table(("can quantize on", "usable", "whole model", "layer by layer"), machine_rows))


def _weights_on_disk(folder: Path) -> int | None:
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    return sum(f.stat().st_size for f in files) if files else None
