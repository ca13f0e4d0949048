"""`nvfp4ctl bench`: memory and speed of a served model, optionally against a baseline.

Prints two markdown tables (memory, then speed) and writes everything as JSON (--out).
A benchmark reports; it asserts nothing about speed.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import click

from nvfp4_admin import engine_metrics
from nvfp4_admin.loadgen import LoadGenerator, served_models
from nvfp4_admin.output import markdown_table


@click.command()
@click.option(
    "--endpoint", required=True, help="OpenAI-compatible base URL of the model to measure."
)
@click.option("--model", help="Served model name (default: the endpoint's first model).")
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Its checkpoint folder, for the size.",
)
@click.option(
    "--metrics-url",
    help="Its engine's Prometheus metrics, for the KV cache rows: Ray's metrics port under"
    " Ray Serve (e.g. http://127.0.0.1:8080), a plain vLLM server's own /metrics. Unset: '-'.",
)
@click.option("--label", default="NVFP4", show_default=True)
@click.option("--baseline-endpoint", help="Base URL of the model to compare with (e.g. BF16).")
@click.option("--baseline-model", help="Served name at the baseline endpoint.")
@click.option("--baseline-model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baseline-metrics-url", help="The baseline engine's metrics (as --metrics-url).")
@click.option("--baseline-label", default="BF16", show_default=True)
@click.option("--api-key", help="Bearer token for both endpoints (or NVFP4CTL_BENCH_API_KEY).")
@click.option(
    "--concurrency",
    "levels",
    multiple=True,
    type=click.IntRange(1),
    default=(1, 8, 32),
    show_default=True,
    help="Concurrent streams per level (repeatable).",
)
@click.option("--prompt-words", type=click.IntRange(1), default=128, show_default=True)
@click.option(
    "--max-tokens",
    type=click.IntRange(2),
    default=128,
    show_default=True,
    help="Tokens each request generates.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds per request.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results as JSON here.  [default: bench/results/bench-<UTC time>.json]",
)
def bench(
    endpoint: str,
    model: str | None,
    model_dir: Path | None,
    metrics_url: str | None,
    label: str,
    baseline_endpoint: str | None,
    baseline_model: str | None,
    baseline_model_dir: Path | None,
    baseline_metrics_url: str | None,
    baseline_label: str,
    api_key: str | None,
    levels: tuple[int, ...],
    prompt_words: int,
    max_tokens: int,
    timeout_s: float,
    out: Path | None,
) -> None:
    """Measure checkpoint size, KV cache room, decode tokens/s and TTFT of a served model.

    Each level sends N concurrent streaming /v1/completions requests that each generate
    --max-tokens tokens. Single-stream decode speed is the median per-stream rate after
    the first token; batched throughput is all tokens over the level's wall time. With
    --baseline-endpoint the same runs go to both and the tables show the ratio.
    """
    if out is None:
        out = Path("bench/results") / time.strftime("bench-%Y%m%dT%H%M%SZ.json", time.gmtime())
    targets = [(label, endpoint, model, model_dir, metrics_url)]
    if baseline_endpoint:
        targets.insert(
            0,
            (
                baseline_label,
                baseline_endpoint,
                baseline_model,
                baseline_model_dir,
                baseline_metrics_url,
            ),
        )
    results = []
    for name, url, served, folder, metrics in targets:
        click.echo(f"measuring {name} at {url} ...", err=True)
        results.append(
            _measure(
                name,
                url,
                served,
                folder,
                metrics,
                api_key,
                list(levels),
                prompt_words,
                max_tokens,
                timeout_s,
            )
        )
    click.echo(render(results, list(levels)))
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "settings": {
            "prompt_words": prompt_words,
            "max_tokens": max_tokens,
            "levels": list(levels),
        },
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    click.echo(f"wrote {out}", err=True)
    failed = [lv["first_error"] for r in results for lv in r["levels"] if lv["errors"]]
    if failed:
        raise click.ClickException(f"some requests failed, e.g. {failed[0]}")


def _measure(
    label: str,
    url: str,
    model: str | None,
    folder: Path | None,
    metrics_url: str | None,
    api_key: str | None,
    levels: list[int],
    prompt_words: int,
    max_tokens: int,
    timeout_s: float,
) -> dict[str, Any]:
    names = served_models(url, api_key)
    if model is None:
        if not names:
            raise click.ClickException(f"{url} serves no model")
        model = names[0]
    elif model not in names:
        raise click.ClickException(
            f"{url} does not serve {model!r} (it serves: {', '.join(names)})"
        )
    if metrics_url:
        engine_metrics.fetch(metrics_url)  # a wrong URL fails now, not after minutes of load
    gen = LoadGenerator(url, model, api_key, prompt_words, max_tokens, timeout_s)
    stats = gen.run(levels)
    metrics: dict[str, Any] = {}
    if metrics_url:
        # After the load: Ray exports an engine's series only once they have been set.
        # A failure now only costs the KV rows, not the measurements already made.
        try:
            metrics = engine_metrics.parse(engine_metrics.fetch(metrics_url), model)
        except engine_metrics.MetricsError as e:
            click.echo(f"note: {e}", err=True)
        else:
            if "kv_cache_tokens" not in metrics:
                click.echo(
                    f"note: no vLLM cache metrics for {model} at {metrics_url}"
                    " (looked for vllm:cache_config_info and ray_vllm_cache_config_info)",
                    err=True,
                )
    return {
        "label": label,
        "endpoint": url,
        "model": model,
        "metrics_url": metrics_url,
        "checkpoint_bytes": checkpoint_bytes(folder) if folder else None,
        "metrics": metrics,
        "levels": [s.summary() for s in stats],
    }


def checkpoint_bytes(folder: Path) -> int:
    """Weights and everything else the checkpoint folder holds (tokenizer, configs)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def render(results: list[dict[str, Any]], levels: list[int]) -> str:
    """The two tables: memory, then speed; a ratio column when there are two results."""
    labels = [r["label"] for r in results]
    ratio = len(results) == 2
    headers = ["", *labels] + ([f"{labels[1]} / {labels[0]}"] if ratio else [])

    def row(name: str, values: list[float | None], fmt: str) -> list[str]:
        cells = [name] + ["-" if v is None else format(v, fmt) for v in values]
        if ratio:
            a, b = values
            cells.append(f"{b / a:.2f}x" if a and b else "-")
        return cells

    sizes = [r["checkpoint_bytes"] or None for r in results]
    # GB for real checkpoints, MB for the tiny test models (one unit per row).
    unit, div = ("GB", 1e9) if max((b or 0) for b in sizes) >= 1e9 else ("MB", 1e6)
    gb = [b / div if b else None for b in sizes]
    kv = [r["metrics"].get("kv_cache_tokens") for r in results]
    rss = [(r["metrics"].get("server_rss_bytes") or 0) / 1e9 or None for r in results]
    memory = [
        row(f"checkpoint size ({unit})", gb, ".2f"),
        row("KV cache capacity (tokens)", kv, ",.0f"),
        row("API server RSS (GB)", rss, ".2f"),
    ]

    def level_value(r: dict[str, Any], c: int, key: str) -> float | None:
        return next((lv[key] for lv in r["levels"] if lv["concurrency"] == c), None)

    speed = []
    for c in levels:
        if c == 1:
            speed.append(
                row(
                    "decode tok/s, 1 stream",
                    [level_value(r, 1, "decode_tok_s_per_stream") for r in results],
                    ".1f",
                )
            )
        else:
            speed.append(
                row(
                    f"throughput tok/s, {c} streams",
                    [level_value(r, c, "throughput_tok_s") for r in results],
                    ".1f",
                )
            )
        speed.append(
            row(
                f"TTFT p50 ms, {c} stream(s)",
                [level_value(r, c, "ttft_p50_ms") for r in results],
                ".0f",
            )
        )
    return "\n".join(
        [
            "### Memory",
            "",
            markdown_table(headers, memory),
            "",
            "### Speed",
            "",
            markdown_table(headers, speed),
        ]
    )
