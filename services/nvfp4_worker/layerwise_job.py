"""A job in layer-by-layer mode: the pipeline's `_execute` for models larger than memory.

Tokenize the calibration and held-out text, quantize one layer at a time (layerwise.py)
into the staging folder, add the tokenizer and build the report. Held-out perplexity and
KL are measured in the same pass: the held-out windows go through each layer twice, as it
was and as quantized, and the final norm and lm_head make the logits at the end.

With a quality target the search runs as in the whole-model job (search.py): each recipe
of the ladder calibrated with every layer quantized (one pass over the layers each,
cheapest first), then, on the closest recipe's quantizer ranges, the most sensitive
layers kept in FP8, then in BF16, found by the same guided bisection. Each such candidate
costs one more pass over the layers (read from the shards again), and the chosen one is
exported in a last pass.
What this mode does not do: sample generations (they need the whole model), and the
layers' sensitivity is measured locally (how much quantizing a layer alone changes its
output on a calibration batch), not as the whole model's KL.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nvfp4_common.jobs import Stage
from nvfp4_common.recipes import QualityTarget
from nvfp4_worker import calibration, evaluate, layerwise, publish, quantize, search
from nvfp4_worker.errors import JobError

if TYPE_CHECKING:
    from pathlib import Path

    from nvfp4_worker.pipeline import _Plan
    from nvfp4_worker.reporter import Reporter


def execute(plan: _Plan, reporter: Reporter, staging: Path) -> dict[str, Any]:
    """Quantize `plan` layer by layer into `staging`; returns the job's report."""
    from transformers import AutoTokenizer

    from nvfp4_worker.pipeline import _size_and_memory, _versions, candidate_size, recipe_ladder

    spec, timings = plan.spec, plan.timings
    t = time.monotonic()
    reporter.progress(Stage.LOADING, 0.2, "loading the tokenizer (layer by layer: no weights)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.source.path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise JobError(f"model {spec.model}: tokenizer cannot be loaded ({exc})") from None
    windows = calibration.build_windows(
        tokenizer, plan.calib, spec.calib_samples, spec.eval_samples, spec.calib_seq_len
    )
    held = windows.held_out
    if held.shape[0] < spec.eval_samples:
        reporter.log(f"only {held.shape[0]} held-out windows for evaluation")
    held_batches = calibration.batches(held, spec.calib_seq_len) if held.numel() else None
    timings["load"] = round(time.monotonic() - t, 3)

    target = spec.target
    searching = target is not None
    calib_batches = calibration.batches(windows.calib, spec.calib_seq_len)

    def on_layer(stage: Stage, what: str) -> Any:
        def report(done: int, total: int) -> None:
            # The reporter raises when the job is cancelled: between layers, never mid-write.
            reporter.progress(stage, done / total, f"{what}: layer {done}/{total}")

        return report

    base: evaluate.Measurement | None = None
    candidates: list[search.Candidate] = []

    def candidate(
        recipe: str | None,
        kept: tuple[str, ...],
        precision: str,
        m: evaluate.Measurement,
        started: float,
    ) -> search.Candidate:
        assert base is not None
        c = search.Candidate(
            recipe=recipe or spec.format.value,
            kept=kept,
            kept_as=precision,
            size_bytes=candidate_size(plan, recipe, kept, precision),
            perplexity=m.perplexity,
            ppl_change_pct=evaluate.change_pct(base.perplexity, m.perplexity),
            kl=m.kl,
            wall_s=round(time.monotonic() - started, 3),
        )
        search.judge(c, target or QualityTarget())
        if searching:
            reporter.log(f"candidate: {c.describe()}{'' if c.meets else f' ({c.why_not})'}")
        return c

    staging.mkdir(parents=True, exist_ok=True)
    # 1. the recipes, every layer quantized, cheapest first: one pass over the layers each
    runs: dict[str, tuple[layerwise.LayerwiseRun, dict[str, float], str | None]] = {}
    chosen: search.Candidate | None = None
    for recipe in recipe_ladder(spec):
        t = time.monotonic()
        reporter.progress(
            Stage.CALIBRATING,
            0.0,
            f"calibrating ({recipe or spec.format.value}) layer by layer"
            f" on {spec.calib_samples} samples",
        )
        run = layerwise.LayerwiseRun(
            plan.source.path,
            spec.model,
            quantize.build_config(spec.format, spec.exclude, recipe),
            staging,
            device=plan.device,
            dtype=plan.dtype,
            calib_shape=(windows.calib.shape[0], windows.calib.shape[1]),
            held_out_shape=(held.shape[0], held.shape[1]) if held_batches else None,
            activation_budget=plan.activation_budget,
        )
        sensitivity = run.calibrate(
            calib_batches,
            held_batches,
            export=not searching,
            base=base is None,
            on_layer=on_layer(Stage.CALIBRATING, "calibrating"),
        )
        timings["calibrate"] = round(timings.get("calibrate", 0.0) + time.monotonic() - t, 3)
        t = time.monotonic()
        if held_batches:
            if base is None:
                base = run.reference()
            assert base.reference is not None
            chosen = candidate(recipe, (), "bf16", run.measured(base.reference), t)
            timings["evaluate"] = round(timings.get("evaluate", 0.0) + time.monotonic() - t, 3)
        elif searching:  # a size-only target and no held-out text: nothing to measure
            base = evaluate.Measurement(None)
            chosen = candidate(recipe, (), "bf16", base, t)
        if chosen is not None:
            candidates.append(chosen)
            runs[chosen.recipe] = (run, sensitivity, recipe)
            if chosen.meets:
                break
    if searching:
        assert target is not None and chosen is not None and base is not None
        if not chosen.meets:
            # 2. the closest recipe's run, keeping its most sensitive layers
            closest = search.closest(candidates)
            run, sensitivity, recipe = runs[closest.recipe]
            reference = base.reference

            def measure(kept: tuple[str, ...], precision: str) -> search.Candidate:
                started = time.monotonic()
                if reference is None:  # no held-out text: judged on its size alone
                    m = evaluate.Measurement(None)
                else:
                    what = f"measuring {len(kept)} layers in {precision.upper()}"
                    m = run.measure(kept, precision, reference, on_layer(Stage.EVALUATING, what))
                return candidate(recipe, kept, precision, m, started)

            chosen = _search(measure, closest, sensitivity, target, candidates, plan, recipe)
        runs.clear()  # the other recipes' quantizer ranges
        t = time.monotonic()
        reporter.progress(Stage.EXPORTING, 0.0, f"exporting: {chosen.describe()}")
        run.export(chosen.kept, chosen.kept_as, on_layer(Stage.EXPORTING, "exporting"))
        timings["export_chosen"] = round(time.monotonic() - t, 3)

    quant_config = run.finish()
    if not quant_config["quantization"].get("quant_algo"):
        raise JobError("the exclude patterns leave no layer to quantize")
    timings.update({f"layerwise_{k}": v for k, v in run.timings.items()})
    reporter.progress(Stage.EXPORTING, 0.5, "writing the tokenizer")
    tokenizer.save_pretrained(staging)  # as quantize.export does
    reporter.progress(Stage.EXPORTING, 1.0, "exported")

    q = quant_config["quantization"]
    output_bytes = publish.dir_bytes(staging)
    kept = chosen.kept if chosen else ()
    if base is not None and chosen is not None and chosen.perplexity is not None:
        reporter.log(
            f"perplexity {base.perplexity:.3f} -> {chosen.perplexity:.3f}"
            f" ({chosen.ppl_change_pct:+.2f}%), KL {chosen.kl:.4f}"
        )
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
        "recipe": recipe,
        "kept_layers": list(kept),
        "kept_as": chosen.kept_as if chosen and kept else None,
        "mode": "layerwise",
        "layerwise": {
            "layers": run.n_layers,
            "activations_spilled": run.spill,
            "activation_bytes": run.activation_bytes,
        },
        "search": {
            "target": target.model_dump(exclude_none=True) if target else None,
            "candidates": [c.row() for c in candidates] if searching else [],
            # Layer by layer: the relative change of each layer's output (see module doc).
            "sensitivity": {k: round(v, 6) for k, v in sensitivity.items()} if searching else {},
        },
        "device": plan.device.type,
        "compute_dtype": str(plan.dtype).removeprefix("torch."),
        "calibration": {
            "data": plan.calib.description,
            "samples": spec.calib_samples,
            "seq_len": spec.calib_seq_len,
            "tokens": int(windows.calib.numel()),
        },
        "evaluation": {
            "held_out_samples": int(held.shape[0]),
            "perplexity_base": base.perplexity if base else None,
            "perplexity_quant": chosen.perplexity if chosen else None,
            "perplexity_change_pct": chosen.ppl_change_pct if chosen else None,
            "kl": chosen.kl if chosen else None,
            # Not measured layer by layer: weight errors and generations need the model.
            "weight_error": evaluate.summary({}),
            "generations": [],
        },
        "timings_s": timings,
        **_size_and_memory(plan, output_bytes, chosen.size_bytes if kept and chosen else None),
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _search(
    measure: Any,
    start: search.Candidate,
    sensitivity: dict[str, float],
    target: QualityTarget,
    candidates: list[search.Candidate],
    plan: _Plan,
    recipe: str | None,
) -> search.Candidate:
    """The most sensitive layers kept in FP8, else in BF16 (search.keep_layers); `measure`
    makes one candidate in one pass over the layers."""
    from nvfp4_worker.pipeline import candidate_size

    order = sorted(sensitivity, key=lambda u: -sensitivity[u])
    t = time.monotonic()
    for precision in search.KEEP_PRECISIONS:
        chosen = search.keep_layers(
            search.NoModel(),
            order,
            measure,
            target,
            lambda kept, p: candidate_size(plan, recipe, kept, p),
            candidates,
            precision,
            sensitivity,
            start,
        )
        if chosen is not None:
            plan.timings["search"] = round(time.monotonic() - t, 3)
            return chosen
    raise JobError(search.Outcome(None, candidates, sensitivity).failure(target))
