"""A job in layer-by-layer mode: the pipeline's `_execute` for models larger than memory.

Tokenize the calibration text, quantize one layer at a time (layerwise.py) into the
staging folder, add the tokenizer and build the report. What the whole-model job does
with the whole model in memory is not done here: held-out perplexity and KL, sample
generations and the quality-target search (JobSpec refuses a target with layerwise);
the report says so with nulls, as a job with eval_samples 0 does.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nvfp4_common.jobs import Stage
from nvfp4_common.recipes import DEFAULT_RECIPE
from nvfp4_worker import calibration, evaluate, layerwise, publish, quantize
from nvfp4_worker.errors import JobError

if TYPE_CHECKING:
    from pathlib import Path

    from nvfp4_worker.pipeline import _Plan
    from nvfp4_worker.reporter import Reporter


def execute(plan: _Plan, reporter: Reporter, staging: Path) -> dict[str, Any]:
    """Quantize `plan` layer by layer into `staging`; returns the job's report."""
    from transformers import AutoTokenizer

    from nvfp4_worker.pipeline import _size_and_memory, _versions

    spec, timings = plan.spec, plan.timings
    t = time.monotonic()
    reporter.progress(Stage.LOADING, 0.2, "loading the tokenizer (layer by layer: no weights)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.source.path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise JobError(f"model {spec.model}: tokenizer cannot be loaded ({exc})") from None
    windows = calibration.build_windows(
        tokenizer, plan.calib, spec.calib_samples, 0, spec.calib_seq_len
    )
    timings["load"] = round(time.monotonic() - t, 3)

    t = time.monotonic()
    recipe = spec.recipe
    cfg = quantize.build_config(spec.format, spec.exclude, recipe)
    reporter.progress(
        Stage.CALIBRATING,
        0.0,
        f"calibrating ({recipe or spec.format.value}) layer by layer on {spec.calib_samples}"
        " samples",
    )

    def on_layer(done: int, total: int) -> None:
        # The reporter raises when the job is cancelled: between layers, never mid-write.
        reporter.progress(Stage.CALIBRATING, done / total, f"layer {done}/{total}")

    staging.mkdir(parents=True, exist_ok=True)
    result = layerwise.quantize_layerwise(
        plan.source.path,
        spec.model,
        windows.calib,
        cfg,
        staging,
        device=plan.device,
        dtype=plan.dtype,
        batches=calibration.batches(windows.calib, spec.calib_seq_len),
        activation_budget=plan.activation_budget,
        on_layer=on_layer,
    )
    if not result.quant_config["quantization"].get("quant_algo"):
        raise JobError("the exclude patterns leave no layer to quantize")
    timings["calibrate_and_export"] = round(time.monotonic() - t, 3)
    timings.update({f"layerwise_{k}": v for k, v in result.timings.items()})
    reporter.progress(Stage.EXPORTING, 0.5, "writing the tokenizer")
    tokenizer.save_pretrained(staging)  # as quantize.export does
    reporter.progress(Stage.EXPORTING, 1.0, "exported")

    q = result.quant_config["quantization"]
    output_bytes = publish.dir_bytes(staging)
    return {
        "job_id": plan.job_id,
        "output_name": plan.final.name,
        "base_model": spec.model,
        "source_path": str(plan.source.path),
        "format": spec.format.value,
        "quant_algo": q.get("quant_algo"),
        "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
        "excluded_modules": q.get("exclude_modules", []),
        "exclude_patterns": list(spec.exclude),
        "recipe": recipe or (DEFAULT_RECIPE if spec.format.value != "fp8" else None),
        "kept_layers": [],
        "mode": "layerwise",
        "layerwise": {
            "layers": result.layers,
            "activations_spilled": result.spilled,
            "activation_bytes": result.activation_bytes,
        },
        "search": {"target": None, "candidates": [], "sensitivity": {}},
        "device": plan.device.type,
        "compute_dtype": str(plan.dtype).removeprefix("torch."),
        "calibration": {
            "data": plan.calib.description,
            "samples": spec.calib_samples,
            "seq_len": spec.calib_seq_len,
            "tokens": int(windows.calib.numel()),
        },
        "evaluation": {
            # Not measured layer by layer: the held-out passes need the whole model.
            "held_out_samples": 0,
            "perplexity_base": None,
            "perplexity_quant": None,
            "perplexity_change_pct": None,
            "kl": None,
            "weight_error": evaluate.summary({}),
            "generations": [],
        },
        "timings_s": timings,
        **_size_and_memory(plan, output_bytes),
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
