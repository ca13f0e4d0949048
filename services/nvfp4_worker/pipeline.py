"""One quantization job from start to finish: `run(spec, settings, reporter, job_id)`.

validate (no weights read) -> load -> evaluate the original -> calibrate + quantize ->
evaluate the quantized model -> export into a temp folder -> model card + report.json ->
rename into models_dir. Every bad input raises JobError with one line before anything is
visible in models_dir; the temp folder is removed on any failure.
"""

from __future__ import annotations

import gc
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nvfp4_common.checkpoint_files import TOKENIZER_FILES, has_tokenizer
from nvfp4_common.jobs import JobResult, JobSpec, QuantFormat, Stage
from nvfp4_common.recipes import (
    DEFAULT_RECIPE,
    LAYERWISE_RECIPES,
    RECIPES,
    SEARCH_LADDER,
    QualityTarget,
)
from nvfp4_common.settings import Settings
from nvfp4_worker import (
    calibration,
    checkpoint,
    cpu_ops,
    evaluate,
    layerwise_job,
    memory,
    modelcard,
    publish,
    quantize,
    search,
    served_speed,
    sources,
)
from nvfp4_worker.errors import JobError

if TYPE_CHECKING:  # the reporter module pulls in the Redis client
    from nvfp4_worker.reporter import Reporter

VERSIONED = ("nvidia-modelopt", "torch", "transformers", "nvfp4-stack")
# Layer sensitivity is measured on a slice of the calibration text (the held-out text
# judges the candidates): 2 windows of at most 256 tokens keep 30-60 probes cheap.
PROBE_WINDOWS = 2
PROBE_TOKENS = 256


@dataclass
class _Plan:
    """Everything checked before weights are loaded."""

    spec: JobSpec
    job_id: str
    final: Path
    source: sources.ModelSource
    info: checkpoint.SourceInfo
    calib: sources.CalibSource
    device: torch.device
    dtype: torch.dtype
    estimate_bytes: int
    source_dtype: str | None = None  # of the source weights, for the model card
    memory_note: str = ""  # the memory check's numbers, for the job's log
    layerwise: bool = False  # one decoder layer at a time (layerwise_job.py)
    activation_budget: int | None = None  # bytes of activations kept in memory, layerwise
    gpu_budgets: tuple[int, ...] = ()  # whole model: weight bytes of each card (memory.Mode)
    timings: dict[str, float] = field(default_factory=dict)


def run(spec: JobSpec, settings: Settings, reporter: Reporter, job_id: str) -> JobResult:
    """Quantize `spec.model` and publish it to `settings.models_dir/<output name>`."""
    started = time.monotonic()
    _check_numbers(spec)
    final = publish.output_path(settings.models_dir, spec.resolved_output_name())
    for stale in publish.remove_stale(settings.models_dir, job_id):
        reporter.log(f"removed stale temp folder {stale.name} of an earlier attempt")
    previous = publish.existing_report(final, job_id)
    if previous is not None:
        reporter.log(f"output {final.name} was already published by this job; reusing it")
        return _result(previous, final)

    reporter.progress(Stage.LOADING, 0.0, "checking inputs")
    plan = _plan(spec, settings, job_id, final)
    reporter.log(
        f"model {plan.source.path} ({plan.info.model_type}), format {spec.format.value},"
        f" device {plan.device.type} ({str(plan.dtype).removeprefix('torch.')}),"
        f" calibration {plan.calib.description}"
    )
    reporter.log(plan.memory_note)
    staging = publish.staging_dir(settings.models_dir, job_id)
    try:
        report = _execute(plan, reporter, staging)
        report["served"] = _served_speed(settings, plan, reporter, staging)
        reporter.progress(Stage.PUBLISHING, 0.0, f"publishing {final.name}")
        report["timings_s"]["total"] = round(time.monotonic() - started, 3)
        _write_outputs(staging, report)
        publish.publish(staging, final)
        reporter.progress(Stage.PUBLISHING, 1.0, f"published {final.name}")
        reporter.log(f"published {final}")
        return _result(report, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _served_speed(
    settings: Settings, plan: _Plan, reporter: Reporter, staging: Path
) -> dict[str, Any]:
    """vLLM's decode speed on the exported checkpoint (served_speed.py), or why not."""
    python = served_speed.python_for(settings.worker_vllm_python)
    if python is None:
        return {"skipped": "no Python with vLLM (NVFP4_WORKER_VLLM_PYTHON)"}
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()  # the job's model is gone; vLLM gets what it held
    reporter.progress(Stage.EVALUATING, 0.0, "measuring vLLM's decode speed on the checkpoint")
    t = time.monotonic()
    result = served_speed.measure(python, staging)
    plan.timings["served_speed"] = round(time.monotonic() - t, 3)
    if "error" in result:
        reporter.log(f"vLLM decode speed not measured: {result['error']}")
    else:
        reporter.log(
            f"{result['engine']} on {result['device']}: {result['decode_tok_s']} tok/s"
            f" decoding one stream, {result['throughput_tok_s']} tok/s with"
            f" {result['streams']} streams"
        )
    return result


def _check_numbers(spec: JobSpec) -> None:
    # JobSpec validates these too; a spec built without validation must still not run.
    if spec.calib_samples <= 0:
        raise JobError(f"calib_samples must be positive (got {spec.calib_samples})")
    if spec.calib_seq_len <= 0:
        raise JobError(f"calib_seq_len must be positive (got {spec.calib_seq_len})")
    if spec.eval_samples < 0:
        raise JobError(f"eval_samples must be 0 or more (got {spec.eval_samples})")


def _device(settings: Settings) -> torch.device:
    available = torch.cuda.is_available()
    if settings.device == "cuda" and not available:
        raise JobError("NVFP4_DEVICE=cuda but no CUDA device is available")
    if settings.device != "cpu" and available:
        return torch.device("cuda")
    return torch.device("cpu")


def _plan(spec: JobSpec, settings: Settings, job_id: str, final: Path) -> _Plan:
    # Cheap checks first, so bad input fails at once: a local model folder, then the
    # calibration data (a hub lookup takes a second); a model download, which may take an
    # hour, last.
    if sources.needs_download(spec.model):
        calib = sources.resolve_calibration(spec.calib_dataset, settings)
        source = sources.resolve_model(spec.model, settings)
    else:
        source = sources.resolve_model(spec.model, settings)
        calib = sources.resolve_calibration(spec.calib_dataset, settings)
    info = checkpoint.inspect_config(source.path, spec.model)
    if info.max_positions is not None and spec.calib_seq_len > info.max_positions:
        raise JobError(
            f"calib_seq_len {spec.calib_seq_len} is above the model's max_position_embeddings"
            f" ({info.max_positions})"
        )
    if not has_tokenizer(source.path):
        # transformers then builds an empty tokenizer without complaint, and the job would
        # fail later with a misleading "calibration data has N tokens".
        raise JobError(
            f"model {spec.model} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        )
    estimate = checkpoint.estimate_output_bytes(source.path, spec.format, spec.exclude)
    publish.check_disk(settings.models_dir, estimate, settings.min_free_disk_gb)
    device = _device(settings)
    if device.type == "cpu":
        cpu_ops.install()  # ModelOpt's NVFP4 fake quantization is CUDA-only
        dtype = getattr(torch, settings.cpu_dtype)
    else:
        dtype = torch.bfloat16
        for card in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(card)
    source_dtype = checkpoint.weights_dtype(source.path)
    # Refused here, before any weights are read: a job that outgrows the container's
    # memory would be OOM-killed and re-queued until its attempts run out.
    need = memory.estimate(
        info.source_bytes, source_dtype, dtype, memory.weights_in_host_memory(device)
    )
    # A model that does not fit whole is quantized layer by layer (layerwise.py), if that
    # fits; a job with a recipe that mode does not run (recipes.LAYERWISE_RECIPES) is not
    # switched.
    mode = (
        memory.choose_mode(
            spec.model,
            need,
            checkpoint.layer_sizes(source.path),
            (spec.calib_samples, spec.calib_seq_len),
            dtype,
            memory.weights_in_host_memory(device),
            memory.room(cap=_gib_bytes(settings.worker_memory_limit_gb)),
            requested=spec.layerwise,
            can_switch=spec.recipe in (None, *LAYERWISE_RECIPES),
            eval_samples=spec.eval_samples,
            runtime=memory.layerwise_runtime(memory.rss_bytes()),
            gpus=memory.gpu_free(device),
        )
        if settings.worker_memory_preflight
        else memory.Mode(
            spec.layerwise,
            f"memory: needs about {memory.gib(need.total)}; not checked (preflight off)",
        )
    )
    return _Plan(
        spec,
        job_id,
        final,
        source,
        info,
        calib,
        device,
        dtype,
        estimate,
        source_dtype,
        mode.note,
        layerwise=mode.layerwise,
        activation_budget=mode.activation_budget,
        gpu_budgets=mode.gpu_budgets,
    )


def _gib_bytes(gb: float | None) -> int | None:
    return None if gb is None else int(gb * 2**30)


def _load(plan: _Plan) -> tuple[Any, torch.nn.Module]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.source.path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise JobError(f"model {plan.spec.model}: tokenizer cannot be loaded ({exc})") from None
    # A model spread over several cards is placed by accelerate within each card's share,
    # and its hooks move activations from card to card; inputs go to the first card.
    spread: dict[str, Any] = (
        {"device_map": "sequential", "max_memory": dict(enumerate(plan.gpu_budgets))}
        if len(plan.gpu_budgets) > 1
        else {}
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            plan.source.path, dtype=plan.dtype, trust_remote_code=False, **spread
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise JobError(f"model {plan.spec.model}: weights cannot be loaded ({first})") from None
    if not spread:
        model = model.to(plan.device)  # type: ignore[arg-type]  # the stub wants a dtype
    return tokenizer, model.eval()


def _execute(plan: _Plan, reporter: Reporter, staging: Path) -> dict[str, Any]:
    if plan.layerwise:
        return layerwise_job.execute(plan, reporter, staging)
    spec, device, timings = plan.spec, plan.device, plan.timings

    def timed(key: str, t0: float) -> None:
        timings[key] = round(time.monotonic() - t0, 3)

    t = time.monotonic()
    reporter.progress(Stage.LOADING, 0.2, "loading tokenizer and weights")
    tokenizer, model = _load(plan)
    reporter.progress(Stage.LOADING, 0.8, "tokenizing calibration data")
    windows = calibration.build_windows(
        tokenizer, plan.calib, spec.calib_samples, spec.eval_samples, spec.calib_seq_len
    )
    if windows.held_out.shape[0] < spec.eval_samples:
        reporter.log(f"only {windows.held_out.shape[0]} held-out windows for evaluation")
    reporter.progress(Stage.LOADING, 1.0, "loaded")
    timed("load", t)

    t = time.monotonic()
    reporter.progress(Stage.EVALUATING, 0.0, "evaluating the original model")
    base = evaluate.measure(
        model, windows.held_out, device, None, _each(reporter, Stage.EVALUATING, "original", 0.9)
    )
    ppl_base = base.perplexity
    probe_windows = windows.calib[:PROBE_WINDOWS, :PROBE_TOKENS]
    probe_ref = evaluate.measure(model, probe_windows, device).reference if spec.target else None
    gen_base = evaluate.generate(model, tokenizer, device)
    timed("evaluate_original", t)

    model, outcome = _quantize(plan, reporter, model, windows, base, probe_windows, probe_ref)
    chosen = outcome.chosen
    assert chosen is not None  # _quantize raises when no candidate keeps the target

    t = time.monotonic()
    reporter.progress(Stage.EVALUATING, 0.0, "evaluating the quantized model")
    with evaluate.quantized_weights(model) as errors:
        gen_quant = evaluate.generate(model, tokenizer, device)
    timed("evaluate_quantized", t)
    ppl_quant, change = chosen.perplexity, chosen.ppl_change_pct
    if ppl_base is not None and ppl_quant is not None:
        reporter.log(
            f"perplexity {ppl_base:.3f} -> {ppl_quant:.3f} ({change:+.2f}%), KL {chosen.kl:.4f}"
        )

    t = time.monotonic()
    reporter.progress(Stage.EXPORTING, 0.0, "exporting the checkpoint")
    quant_config = quantize.export(model, tokenizer, staging)
    reporter.progress(Stage.EXPORTING, 1.0, "exported")
    timed("export", t)

    output_bytes = publish.dir_bytes(staging)
    summary = evaluate.summary(errors)
    return {
        "job_id": plan.job_id,
        "output_name": plan.final.name,
        "base_model": spec.model,
        "source_path": str(plan.source.path),
        "format": spec.format.value,
        "quant_algo": quant_config["quantization"].get("quant_algo"),
        "kv_cache_quant_algo": quant_config["quantization"].get("kv_cache_quant_algo"),
        "excluded_modules": quant_config["quantization"].get("exclude_modules", []),
        "exclude_patterns": list(spec.exclude),
        "recipe": chosen.recipe,
        "kept_layers": list(chosen.kept),
        "kept_as": chosen.kept_as if chosen.kept else None,
        "search": {
            "target": spec.target.model_dump(exclude_none=True) if spec.target else None,
            "candidates": [c.row() for c in outcome.candidates],
            "sensitivity": {k: round(v, 6) for k, v in outcome.sensitivity.items()},
        },
        "device": device.type,
        "compute_dtype": str(plan.dtype).removeprefix("torch."),
        "calibration": {
            "data": plan.calib.description,
            "samples": spec.calib_samples,
            "seq_len": spec.calib_seq_len,
            "tokens": int(windows.calib.numel()),
        },
        "evaluation": {
            "held_out_samples": int(windows.held_out.shape[0]),
            "perplexity_base": ppl_base,
            "perplexity_quant": ppl_quant,
            "perplexity_change_pct": change,
            "kl": chosen.kl,
            "weight_error": summary,
            "generations": [
                {"prompt": b["prompt"], "base": b["completion"], "quantized": q["completion"]}
                for b, q in zip(gen_base, gen_quant, strict=True)
            ],
        },
        "timings_s": timings,
        **_size_and_memory(plan, output_bytes, chosen.size_bytes),
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _quantize(
    plan: _Plan,
    reporter: Reporter,
    model: torch.nn.Module,
    windows: calibration.TokenWindows,
    base: evaluate.Measurement,
    probe_windows: torch.Tensor,
    probe_ref: evaluate.Reference | None,
) -> tuple[torch.nn.Module, search.Outcome]:
    """Calibrate with the job's recipe; with a target, search for the smallest candidate
    that keeps it (search.py). Returns the model as the chosen candidate is exported."""
    spec, device, timings = plan.spec, plan.device, plan.timings
    target = spec.target or QualityTarget()
    ladder = recipe_ladder(spec)
    loop = calibration.make_forward_loop(
        windows.calib, device, _each(reporter, Stage.CALIBRATING, "calibration batch", 1.0)
    )
    candidates: list[search.Candidate] = []

    def calibrate(recipe: str | None, fresh: bool) -> torch.nn.Module:
        nonlocal model
        t = time.monotonic()
        if fresh:  # mtq.quantize works in place: start again from the original weights
            del model
            gc.collect()
            model = _load(plan)[1]
        reporter.progress(
            Stage.CALIBRATING,
            0.0,
            f"calibrating ({recipe or spec.format.value}) on {spec.calib_samples} samples",
        )
        model = quantize.quantize(
            model, quantize.build_config(spec.format, spec.exclude, recipe), loop
        )
        if quantize.quantized_layer_count(model) == 0:
            raise JobError("the exclude patterns leave no layer to quantize")
        timings["calibrate"] = round(timings.get("calibrate", 0.0) + time.monotonic() - t, 3)
        return model

    def size_of(recipe: str | None, kept: tuple[str, ...], precision: str = "bf16") -> int:
        return candidate_size(plan, recipe, kept, precision)

    def measure(
        recipe: str | None, kept: tuple[str, ...], precision: str = "bf16"
    ) -> search.Candidate:
        t = time.monotonic()
        name = recipe or spec.format.value
        what = f"{len(kept)} layers in {precision.upper()}" if kept else "every layer quantized"
        reporter.progress(Stage.EVALUATING, 0.0, f"measuring {name}, {what}")
        with evaluate.quantized_weights(model):
            m = evaluate.measure(model, windows.held_out, device, base.reference)
        c = search.Candidate(
            recipe=name,
            kept=kept,
            kept_as=precision,
            size_bytes=size_of(recipe, kept, precision),
            perplexity=m.perplexity,
            ppl_change_pct=evaluate.change_pct(base.perplexity, m.perplexity),
            kl=m.kl,
            wall_s=round(time.monotonic() - t, 3),
        )
        search.judge(c, target)
        reporter.log(f"candidate: {c.describe()}{'' if c.meets else f' ({c.why_not})'}")
        return c

    # 1. the recipes, every layer quantized, cheapest first
    for i, recipe in enumerate(ladder):
        model = calibrate(recipe, fresh=i > 0)
        c = measure(recipe, ())
        candidates.append(c)
        if c.meets:
            return model, search.Outcome(c, candidates)
    # 2. the closest recipe, keeping its most sensitive layers in FP8, else in BF16
    closest = search.closest(candidates)
    recipe = ladder[[c.recipe for c in candidates].index(closest.recipe)]
    if recipe != ladder[-1]:
        model = calibrate(recipe, fresh=True)
    layers = search.Layers(model)
    t = time.monotonic()
    reporter.progress(
        Stage.EVALUATING, 0.0, f"measuring the sensitivity of {len(layers.units)} layers"
    )

    def probe() -> float | None:
        with evaluate.quantized_weights(model):
            return evaluate.measure(model, probe_windows, device, probe_ref).kl

    sens = search.sensitivity(layers, probe, reporter.log)
    timings["sensitivity"] = round(time.monotonic() - t, 3)
    order = sorted(sens, key=lambda u: -sens[u])
    chosen = None
    for precision in search.KEEP_PRECISIONS:
        chosen = search.keep_layers(
            layers,
            order,
            lambda kept, p: measure(recipe, kept, p),
            target,
            lambda kept, p: size_of(recipe, kept, p),
            candidates,
            precision,
            sens,
            closest,
        )
        if chosen is not None:
            break
    outcome = search.Outcome(chosen, candidates, sens)
    if chosen is None:
        raise JobError(outcome.failure(target))
    return model, outcome


def recipe_ladder(spec: JobSpec) -> tuple[str | None, ...]:
    """The recipes a job calibrates, in order: the one it names; with a quality target and
    no recipe, the search ladder (cheapest first; a size alone is the same for each
    recipe); else the default."""
    if spec.recipe is not None or spec.format is QuantFormat.FP8:
        return (spec.recipe,)
    return SEARCH_LADDER if spec.target and spec.target.has_quality else (DEFAULT_RECIPE,)


def candidate_size(
    plan: _Plan, recipe: str | None, kept: tuple[str, ...], precision: str = "bf16"
) -> int:
    """The estimated checkpoint size of a search candidate."""
    spec = plan.spec
    keeps = [*spec.exclude, *(RECIPES[recipe].keeps if recipe else ())]
    layers = [f"{k}." for k in kept]
    if precision == "fp8":
        return checkpoint.estimate_output_bytes(plan.source.path, spec.format, keeps, layers)
    return checkpoint.estimate_output_bytes(plan.source.path, spec.format, keeps + layers)


def _each(reporter: Reporter, stage: Stage, what: str, scale: float) -> Any:
    def on_batch(k: int, n: int) -> None:
        reporter.progress(stage, scale * k / n, f"{what} {k}/{n}")

    return on_batch


def _size_and_memory(
    plan: _Plan, output_bytes: int, estimated: int | None = None
) -> dict[str, Any]:
    """The report's `size` and `memory` parts, alike for every mode of a job; `estimated`
    is the published candidate's estimate when a search chose it."""
    source = plan.info.source_bytes
    return {
        "size": {
            "source_bytes": source,
            "source_dtype": plan.source_dtype,
            "output_bytes": output_bytes,
            "estimated_output_bytes": estimated or plan.estimate_bytes,
            "reduction_pct": (1 - output_bytes / source) * 100 if source else None,
        },
        "memory": {
            "peak_rss_bytes": evaluate.peak_rss_bytes(),
            "peak_gpu_bytes": evaluate.peak_gpu_bytes(plan.device),
            "gpus": len(plan.gpu_budgets) or (1 if plan.device.type == "cuda" else 0),
        },
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist.removeprefix("nvidia-")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def _write_outputs(staging: Path, report: dict[str, Any]) -> None:
    (staging / publish.REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (staging / "README.md").write_text(modelcard.render(report))


def _result(report: dict[str, Any], final: Path) -> JobResult:
    ev, size = report["evaluation"], report["size"]
    return JobResult(
        output_name=final.name,
        output_path=str(final),
        source_bytes=size["source_bytes"],
        output_bytes=size["output_bytes"],
        perplexity_base=ev.get("perplexity_base"),
        perplexity_quant=ev.get("perplexity_quant"),
        perplexity_change_pct=ev.get("perplexity_change_pct"),
        kl=ev.get("kl"),
        recipe=report.get("recipe"),
        kept_layers=report.get("kept_layers", []),
        kept_as=report.get("kept_as"),
        duration_s=report["timings_s"].get("total", 0.0),
    )
