"""`nvfp4ctl jobs ...`: submit and manage quantization jobs through the job queue."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from nvfp4_admin.context import AppContext, format_option, json_option, pass_app
from nvfp4_admin.output import (
    bar,
    emit_json,
    human_age,
    human_bytes,
    parse_duration,
    since,
    table,
)
from nvfp4_admin.sizing import checkpoint_sizes, read_config
from nvfp4_common.errors import Nvfp4Error
from nvfp4_common.jobs import Job, JobSpec, JobState, Priority, QuantFormat, Stage
from nvfp4_common.queue import CancelOutcome, JobQueue, through_restarts
from nvfp4_common.recipes import RECIPES, recipe_help

# The stages of a claimed job in the order the worker runs them (nvfp4_worker.pipeline),
# for "(i/n)" in progress lines: the model is evaluated before calibration and again after.
_RUN_ORDER = [
    Stage.LOADING,
    Stage.EVALUATING,
    Stage.CALIBRATING,
    Stage.EVALUATING,
    Stage.EXPORTING,
    Stage.PUBLISHING,
]

# JobSpec field -> the `jobs submit` parameter that sets it, to name it in errors.
_SPEC_PARAMS = {
    "model": "model",
    "format": "fmt",
    "calib_dataset": "calib_dataset",
    "calib_samples": "calib_samples",
    "calib_seq_len": "calib_seq_len",
    "eval_samples": "eval_samples",
    "exclude": "exclude",
    "output_name": "name",
    "recipe": "recipe",
    "max_ppl_increase_pct": "max_ppl_increase",
    "max_kl": "max_kl",
    "max_size_gb": "max_size_gb",
    "layerwise": "layerwise",
}


class Percent(click.ParamType):
    """A percentage: `5%` or `5`."""

    name = "PERCENT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return float(str(value).strip().removesuffix("%"))
        except ValueError:
            self.fail(f"{value!r} is not a percentage such as 5%", param, ctx)


@click.group()
def jobs() -> None:
    """Submit, inspect and control quantization jobs."""


@jobs.command()
@click.argument("model")
@format_option("Target format: NVFP4 weights+activations, plus an FP8 KV cache, or FP8.")
@click.option(
    "--calib-dataset", help="Hugging Face dataset id, or a local .txt/.jsonl file or folder."
)
@click.option("--calib-samples", type=click.IntRange(1), help="Calibration samples.")
@click.option("--calib-seq-len", type=click.IntRange(1), help="Tokens per calibration sample.")
@click.option(
    "--eval-samples", type=click.IntRange(0), help="Held-out samples for perplexity; 0 skips."
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Glob of modules kept in high precision (repeatable), e.g. '*down_proj*'.",
)
@click.option("--name", help="Output folder name under the models directory.")
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    help="Calibration recipe, used as it is (no recipe search): " + recipe_help() + ".",
)
@click.option(
    "--max-ppl-increase",
    type=Percent(),
    help="Quality target: held-out perplexity may rise at most this much, e.g. 5%. The"
    " worker keeps the most sensitive layers in FP8 (else BF16) until it holds.",
)
@click.option(
    "--max-kl",
    type=float,
    help="Quality target: mean per-token KL divergence from the original on held-out text,"
    " e.g. 0.05.",
)
@click.option("--max-size-gb", type=float, help="Size budget of the checkpoint in GB (10^9 bytes).")
@click.option(
    "--layerwise",
    is_flag=True,
    help="Quantize one decoder layer at a time (memory bounded by a layer, not the model;"
    " recipes nvfp4 and nvfp4-4over6). The worker also chooses it for a model that does"
    " not fit.",
)
@click.option(
    "--priority",
    type=click.Choice([p.value for p in Priority]),
    default=Priority.NORMAL.value,
    show_default=True,
)
@click.option(
    "--wait", is_flag=True, help="Show live progress until the job ends; exit 1 if it fails."
)
@json_option
@pass_app
def submit(
    app: AppContext,
    model: str,
    fmt: str,
    calib_dataset: str | None,
    calib_samples: int | None,
    calib_seq_len: int | None,
    eval_samples: int | None,
    exclude: tuple[str, ...],
    name: str | None,
    recipe: str | None,
    max_ppl_increase: float | None,
    max_kl: float | None,
    max_size_gb: float | None,
    layerwise: bool,
    priority: str,
    wait: bool,
    as_json: bool,
) -> None:
    """Queue a job that quantizes MODEL (a Hugging Face id or a local folder).

    Unset options take the job defaults (512 calibration samples of 2048 tokens from
    allenai/c4, 32 evaluation samples). With a target (--max-ppl-increase, --max-kl,
    --max-size-gb) the worker publishes the smallest candidate that keeps it, or fails
    with the table of what it tried; without --recipe it tries the cheapest recipes first.
    """
    target = {
        "max_ppl_increase_pct": max_ppl_increase,
        "max_kl": max_kl,
        "max_size_gb": max_size_gb,
    }
    fields: dict[str, Any] = {
        "calib_dataset": calib_dataset,
        "calib_samples": calib_samples,
        "calib_seq_len": calib_seq_len,
        "eval_samples": eval_samples,
        "output_name": name,
        "recipe": recipe,
        "target": {k: v for k, v in target.items() if v is not None} or None,
        "layerwise": layerwise or None,
    }
    ctx = click.get_current_context()
    try:
        spec = JobSpec(
            model=model,
            format=QuantFormat(fmt),
            exclude=list(exclude),
            **{k: v for k, v in fields.items() if v is not None},
        )
    except ValidationError as e:
        # A value the job model refuses is a usage error of the option that carried it.
        err = e.errors()[0]
        loc = [str(part) for part in err["loc"]]
        message = err["msg"].removeprefix("Value error, ")
        field = loc[-1] if loc else message.partition(":")[0]
        param = next((p for p in ctx.command.params if p.name == _SPEC_PARAMS.get(field)), None)
        raise click.BadParameter(message.removeprefix(f"{field}: "), ctx=ctx, param=param) from None
    _check_size_budget(spec, ctx)
    job = app.queue.submit(spec, Priority(priority))
    if not as_json:
        click.echo(f"submitted {job.id}: {spec.model} -> {spec.resolved_output_name()}")
    if wait:
        job = _watch(app.queue, job.id, quiet=as_json)
    if as_json:
        emit_json(job)  # one document: the job as submitted, or as it ended with --wait
    if wait and job.state != JobState.SUCCEEDED:
        sys.exit(1)


def _check_size_budget(spec: JobSpec, ctx: click.Context) -> None:
    """Refuse a size budget below the all-NVFP4 checkpoint, when the CLI can read the
    model's config.json (a local folder); for a hub model the worker checks it."""
    budget = spec.target.max_size_gb if spec.target else None
    config = Path(spec.model) / "config.json"
    if budget is None or not config.is_file():
        return
    try:
        _, shape = read_config(config)
    except Nvfp4Error:
        return  # the worker reports a bad config with the job
    fmt = "fp8" if spec.format is QuantFormat.FP8 else "nvfp4"
    smallest = checkpoint_sizes(shape, tuple(spec.exclude)).quant_bytes[fmt]
    if smallest > budget * 1e9:
        param = next(p for p in ctx.command.params if p.name == "max_size_gb")
        raise click.BadParameter(
            f"{budget:g} GB is below the smallest {fmt} checkpoint of this model"
            f" ({smallest / 1e9:.3f} GB, every layer quantized)",
            ctx=ctx,
            param=param,
        )


@jobs.command("list")
@click.option(
    "--state", type=click.Choice([s.value for s in JobState]), help="Only jobs in this state."
)
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@json_option
@pass_app
def list_jobs(app: AppContext, state: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    found = app.queue.jobs(JobState(state) if state else None, limit=limit)
    if as_json:
        emit_json(found)
        return
    rows = [
        (
            j.id,
            j.state.value,
            j.priority.value,
            _progress_text(j),
            j.spec.model,
            j.spec.format.value,
            since(j.created_at),
            j.worker_id,
        )
        for j in found
    ]
    headers = ("id", "state", "priority", "progress", "model", "format", "created", "worker")
    click.echo(table(headers, rows, empty="no jobs"))


@jobs.command()
@click.argument("job_id", metavar="ID")
@json_option
@pass_app
def show(app: AppContext, job_id: str, as_json: bool) -> None:
    """Show one job: spec, progress, error and result."""
    job = app.queue.get(job_id)
    if as_json:
        emit_json(job)
        return
    s = job.spec
    lines = [
        ("id", job.id),
        ("state", job.state.value + (" (cancel requested)" if job.cancel_requested else "")),
        ("model", s.model),
        ("format", s.format.value),
        ("output", s.resolved_output_name()),
        ("priority", job.priority.value),
        ("calibration", f"{s.calib_samples} x {s.calib_seq_len} tokens from {s.calib_dataset}"),
        ("eval samples", s.eval_samples),
        ("excluded", ", ".join(s.exclude) or "-"),
        ("recipe", s.recipe or ("cheapest first" if s.target else "default")),
        ("target", s.target.describe() if s.target else "-"),
        ("attempts", f"{job.attempts} of {job.max_attempts}"),
        ("worker", job.worker_id),
        (
            "progress",
            _progress_text(job) + (f"  {job.progress.message}" if job.progress.message else ""),
        ),
        ("created", since(job.created_at)),
        ("started", since(job.started_at)),
        ("ended", since(job.ended_at)),
        ("error", job.error),
    ]
    r = job.result
    if r is not None:
        lines += [
            ("output path", r.output_path),
            (
                "size",
                f"{human_bytes(r.source_bytes)} -> {human_bytes(r.output_bytes)}"
                f" ({r.output_bytes / max(r.source_bytes, 1):.2f}x)",
            ),
            (
                "perplexity",
                _perplexity(r.perplexity_base, r.perplexity_quant, r.perplexity_change_pct),
            ),
            ("KL", "-" if r.kl is None else f"{r.kl:.4f}"),
            ("recipe used", r.recipe),
            (f"kept in {(r.kept_as or 'bf16').upper()}", ", ".join(r.kept_layers) or "-"),
            ("duration", human_age(r.duration_s)),
            ("report", f"{r.output_path}/report.json"),
        ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key.ljust(width)}  {'-' if value in (None, '') else value}")


@jobs.command()
@click.argument("job_id", metavar="ID")
@pass_app
def watch(app: AppContext, job_id: str) -> None:
    """Show a job's live progress until it ends; exit 1 unless it succeeded."""
    final = _watch(app.queue, job_id, quiet=False)
    if final.state != JobState.SUCCEEDED:
        sys.exit(1)


@jobs.command()
@click.argument("job_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@pass_app
def logs(app: AppContext, job_id: str, follow: bool) -> None:
    """Print a job's log lines (the most recent ones are kept)."""
    app.queue.get(job_id)  # a clear error for an unknown id instead of an empty log
    lines = app.queue.follow_logs(job_id) if follow else app.queue.logs(job_id)
    for line in lines:
        click.echo(line)


@jobs.command()
@click.argument("job_id", metavar="ID")
@pass_app
def cancel(app: AppContext, job_id: str) -> None:
    """Cancel a job: a queued job ends now, a running one is stopped by its worker."""
    before = app.queue.get(job_id).state
    if before.ended:  # nothing to do is not an error here (the queue refuses it)
        click.echo(f"{job_id} is already {before.value}; nothing to cancel")
        return
    if app.queue.cancel(job_id) is CancelOutcome.CANCELLED:
        click.echo(f"{job_id} cancelled")
    else:
        click.echo(f"{job_id} cancelling: its worker stops the job (see `jobs watch {job_id}`)")


@jobs.command()
@click.argument("job_id", metavar="ID")
@pass_app
def retry(app: AppContext, job_id: str) -> None:
    """Queue a failed or cancelled job again with a fresh attempt budget."""
    job = app.queue.retry(job_id)
    click.echo(f"{job.id} queued again ({job.spec.model})")


@jobs.command()
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    help="Delete ended jobs that ended longer ago than this (e.g. 90m, 12h, 7d).",
)
@json_option
@pass_app
def purge(app: AppContext, older_than: str, as_json: bool) -> None:
    """Delete ended jobs and their logs (their checkpoints stay on disk)."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--older-than") from None
    ids = app.queue.purge(seconds)
    if as_json:
        emit_json({"purged": ids})
    else:
        click.echo(f"purged {len(ids)} job(s)" + (": " + " ".join(ids) if ids else ""))


# --- helpers --------------------------------------------------------------------------


def _step(stage: Stage, after: int = 0) -> int:
    """1-based place of `stage` in the run order: its first place at or after step `after`.

    A watch passes the step it showed last, so the second evaluation counts as step 4 once
    calibration (step 3) was seen; a single look (list, show) gives the first place.
    """
    if stage not in _RUN_ORDER:  # queued or done: no step of its own
        return after
    for i in range(max(after - 1, 0), len(_RUN_ORDER)):
        if _RUN_ORDER[i] == stage:
            return i + 1
    return _RUN_ORDER.index(stage) + 1


def _progress_text(job: Job, step: int | None = None) -> str:
    p = job.progress
    if job.state == JobState.SUCCEEDED:
        return "done"
    if job.state == JobState.QUEUED or p.stage == Stage.QUEUED:
        return "queued" if job.state == JobState.QUEUED else job.state.value
    step = (_step(p.stage) if step is None else step) or len(_RUN_ORDER)
    return f"{p.stage.value} {p.fraction:.0%} ({step}/{len(_RUN_ORDER)})"


def _perplexity(base: float | None, quant: float | None, change: float | None) -> str:
    if base is None or quant is None:
        return "-"
    return f"{base:.2f} -> {quant:.2f}" + (f" ({change:+.1f}%)" if change is not None else "")


def _watch(queue: JobQueue, job_id: str, quiet: bool, poll_s: float = 0.5) -> Job:
    """Redraw one progress line (or print changes when not a terminal) until the job ends."""
    tty = sys.stdout.isatty()
    last = ""
    step = 0  # the run-order step shown last: stage numbers only go forward

    def reconnecting(e: Exception, wait_s: float) -> None:
        if not quiet:
            click.echo(f"redis unavailable ({e}); retrying in {wait_s:.1f} s", err=True)

    while True:
        job = through_restarts(lambda: queue.get(job_id), on_retry=reconnecting)
        step = _step(job.progress.stage, step)
        text = _progress_text(job, step)
        line = f"{job.id} {bar(job.progress.fraction)} {job.state.value}: {text}"
        if job.progress.message:
            line += f"  {job.progress.message}"
        if not quiet and line != last:
            if tty:
                width = max(len(last), len(line))
                click.echo("\r" + line.ljust(width), nl=False)
            else:
                click.echo(line)
            last = line
        if job.state.ended:
            break
        time.sleep(poll_s)
    if not quiet:
        if tty:
            click.echo()
        if job.state == JobState.SUCCEEDED and job.result:
            click.echo(f"succeeded: {job.result.output_path}")
        elif job.state != JobState.SUCCEEDED:
            click.echo(f"{job.state.value}: {job.error or 'no error recorded'}", err=True)
    return job
