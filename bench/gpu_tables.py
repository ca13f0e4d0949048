"""Markdown tables from the GPU benchmark results (bench/results/gpu_*.json).

Prints the tables; with `--update docs/benchmarks.md` it also replaces the part of that
file between the `<!-- gpu-tables:start -->` and `<!-- gpu-tables:end -->` markers, so
the document always shows what the JSON files hold.

    python3 bench/gpu_tables.py [--results bench/results] [--update docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- gpu-tables:start -->", "<!-- gpu-tables:end -->"
GB, GIB = 1e9, 1024**3


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"gpu_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def card_table(card: dict[str, Any]) -> str:
    smi = card.get("nvidia_smi", {})
    bw = card["bandwidth"]
    rows = [
        ["card", smi.get("name") or card["torch_name"]],
        ["memory", f"{card['memory_gib']} GiB"],
        ["driver", smi.get("driver_version")],
        ["torch / CUDA", f"{card['torch']} / {card['cuda']}"],
        ["copy bandwidth (read + write)", f"{bw['copy_tb_per_s']} TB/s"],
        ["measured", card["measured_at"]],
    ]
    return _table(["", ""], rows)


def quantize_table(q: dict[str, Any]) -> str:
    rows = []
    for r in sorted(q["rows"], key=lambda r: r["calib_samples"]):
        t = r["timings_s"]
        evaluate = t.get("evaluate_original", 0) + t.get("evaluate_quantized", 0)
        rows.append(
            [
                r["calib_samples"],
                f"{r['calib_tokens']:,}",
                r["wall_s"],
                t.get("load"),
                t.get("calibrate"),
                round(evaluate, 1),
                t.get("export"),
                round(r["peak_gpu_bytes"] / GIB, 1) if r["peak_gpu_bytes"] else None,
                round(r["peak_rss_bytes"] / GIB, 1),
            ]
        )
    header = ["calib samples", "tokens", "wall s", "load s", "calibrate s"]
    header += ["evaluate s", "export s", "peak GPU GiB", "peak RSS GiB"]
    out = _table(header, rows)
    for s in q.get("skipped", []):
        out += f"\n\nNot run: {s['calib_samples']} samples ({s['reason'][:200]})."
    return out


def size_table(q: dict[str, Any] | None, v: dict[str, Any] | None) -> str:
    vrows = {r["label"]: r for r in (v or {}).get("rows", [])}
    rows = []
    first = (q or {}).get("rows", [None])[0] if q and q["rows"] else None
    for label in ("bf16", "nvfp4"):
        r = vrows.get(label)
        disk = r["bytes"]["tensor_bytes"] if r else None
        if disk is None and first:
            disk = first["source_bytes" if label == "bf16" else "output_safetensors_bytes"]
        rows.append(
            [
                label.upper(),
                round(disk / GB, 2) if disk else None,
                r.get("model_loading_gib") if r else None,
                round(r["bytes"]["read_per_step_bytes"] / GB, 2) if r else None,
            ]
        )
    header = ["format", "checkpoint GB", "vLLM weights loaded GiB", "read per decode step GB"]
    return _table(header, rows)


def decode_table(v: dict[str, Any]) -> str:
    rows = []
    for r in v["rows"]:
        if "error" in r:
            rows.append([r["label"].upper(), "error: " + r["error"].splitlines()[-1][:120]])
            continue
        for key in ("b1", "b32"):
            m = r[key]
            rows.append(
                [
                    r["label"].upper(),
                    m["batch"],
                    m["decode_tok_s"],
                    m["bound_tok_s"],
                    f"{m['fraction_of_bound']:.0%}",
                    m["ttft_ms"],
                    r["startup_s"],
                ]
            )
    header = ["format", "batch", "decode tok/s", "bound tok/s", "of bound", "TTFT ms"]
    out = _table([*header, "engine start s"], rows)
    kernels = {k for r in v["rows"] for k in r.get("kernel_lines", [])}
    if kernels:
        out += "\n\nvLLM's NVFP4 kernel log lines: " + "; ".join(f"`{k}`" for k in sorted(kernels))
    return out


def serve_table(s: dict[str, Any]) -> str:
    """Our client's figures per endpoint and concurrency; with `vllm bench serve` figures
    in the rows (gpu_serve.py --vllm-bench), three more columns of vLLM's own client."""

    def ratio(r: dict[str, Any]) -> str | None:
        return f"{r['tok_s_ratio']:.2f}x" if "tok_s_ratio" in r else None

    def extra(r: dict[str, Any]) -> str | None:
        return f"{r['extra_ttft_p50_ms']:+.1f}" if "extra_ttft_p50_ms" in r else None

    with_vllm = any("vllm_bench" in r for r in s["rows"])

    def vllm_cells(r: dict[str, Any]) -> list[Any]:
        v = r.get("vllm_bench") or {}
        if "error" in v:
            return ["error", None, None, None]
        tok_s = v.get("tok_s")
        shown = f"{tok_s} ({ratio(v)})" if tok_s is not None and ratio(v) else tok_s
        return [shown, v.get("ttft_p50_ms"), extra(v), v.get("ttft_p99_ms")]

    rows = [
        [
            r["target"],
            r["concurrency"],
            r["tok_s"],
            ratio(r),
            r["ttft_p50_ms"],
            extra(r),
            r["ttft_p95_ms"],
            r["per_request_tok_s"],
            *(vllm_cells(r) if with_vllm else []),
        ]
        for r in sorted(s["rows"], key=lambda r: r["concurrency"])
    ]
    header = ["endpoint", "concurrency", "output tok/s", "vs plain", "TTFT p50 ms", "+ms"]
    header += ["TTFT p95 ms", "tok/s per request"]
    if with_vllm:
        header += ["vllm bench tok/s (vs plain)", "vllm bench TTFT p50 ms", "+ms"]
        header += ["vllm bench TTFT p99 ms"]
    out = _table(header, rows)
    if with_vllm:
        out += (
            "\n\nThe `vllm bench` columns: `vllm bench serve --dataset-name random` (128-token"
            " prompts, `--ignore-eos`, `--max-concurrency` as the row) against the same endpoint"
            " right after our client."
        )
    starts = ", ".join(f"{k} {v} s" for k, v in s.get("startup_s", {}).items())
    if starts:
        out += f"\n\nStart to first answer: {starts}."
    for k, e in s.get("errors", {}).items():
        if e and not k.endswith("_log"):
            out += f"\n\n{k}: `{e.strip().splitlines()[-1][:300]}`"
    for r in s["rows"]:
        err = (r.get("vllm_bench") or {}).get("error")
        if err:
            last = err.strip().splitlines()[-1][:300]
            out += f"\n\nvllm bench, {r['target']} at {r['concurrency']}: `{last}`"
    return out


def render(results: Path) -> str:
    card, q, v, s = (_load(results, n) for n in ("card", "quantize", "vllm", "serve"))
    parts = []
    if card:
        parts += ["#### Card", card_table(card)]
    if q:
        parts += [
            "#### Quantization job on the GPU (`pipeline.run`, seq len 2048)",
            quantize_table(q),
        ]
    if q or v:
        parts += ["#### Checkpoint and weight memory", size_table(q, v)]
    if v:
        parts += ["#### Decode and TTFT (vLLM offline API)", decode_table(v)]
    if s:
        parts += ["#### Our endpoint against vLLM's OpenAI server", serve_table(s)]
    return "\n\n".join(parts) + "\n"


def update(doc: Path, tables: str) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{tables}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--update", type=Path, help="markdown file with the gpu-tables markers")
    args = parser.parse_args()
    tables = render(args.results)
    print(tables)
    if args.update:
        update(args.update, tables)


if __name__ == "__main__":
    main()
