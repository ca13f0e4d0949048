"""The worker's own quantization job on a GPU: wall time, memory and size per calibration size.

Each run is `nvfp4_worker.pipeline.run` (load, evaluate, calibrate + quantize with ModelOpt,
evaluate, export, publish) with `device=cuda`, in a fresh process, so peak host RSS and
peak GPU memory belong to that run alone. The first sample count's checkpoint is kept
(for the serving benchmarks); the others are deleted after they are measured. Runs that
would not finish before `--deadline-s` are skipped and reported as such.

    python3 bench/gpu_quantize.py --model /tmp/models/qwen3-8b-shaped-bf16 \
        --calib /tmp/models/calib.txt --models-dir /tmp/models/published \
        --samples 512 64 128 256 --out bench/results/gpu_quantize.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def one_run(args: argparse.Namespace) -> None:
    """Child process: one pipeline run; prints one JSON line prefixed RESULT."""
    from nvfp4_common.jobs import JobSpec, QuantFormat
    from nvfp4_common.recipes import QualityTarget
    from nvfp4_common.settings import Settings
    from nvfp4_worker.errors import JobError
    from nvfp4_worker.pipeline import run
    from nvfp4_worker.reporter import PrintReporter

    settings = Settings(
        models_dir=args.models_dir,
        model_roots=[args.model.parent, args.calib.parent],
        device=args.device,
        hf_offline=True,
        # vLLM's speed on the published checkpoint only when asked: it is not part of the
        # job's cost the other runs compare.
        worker_vllm_python="auto" if args.served_speed else "",
        _env_file=None,  # type: ignore[call-arg]
    )
    target = (
        QualityTarget(max_kl=args.max_kl, max_ppl_increase_pct=args.max_ppl_increase)
        if args.max_kl or args.max_ppl_increase
        else None
    )
    spec = JobSpec(
        model=str(args.model),
        format=QuantFormat.NVFP4,
        calib_dataset=str(args.calib),
        calib_samples=args.one,
        calib_seq_len=args.seq_len,
        eval_samples=args.eval_samples,
        output_name=f"{args.model.name.removesuffix('-bf16')}-nvfp4-c{args.one}"
        + ("-target" if target else "")
        + ("-layerwise" if args.layerwise else ""),
        target=target,
        layerwise=args.layerwise,
    )
    t0 = time.monotonic()
    try:
        result = run(spec, settings, PrintReporter(), job_id=f"gpu-bench-{args.one}")
    except JobError as exc:  # a target no candidate keeps: the search's whole cost
        import resource

        import torch

        row_failed = {
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "calib_samples": args.one,
            "seq_len": args.seq_len,
            "target_max_kl": args.max_kl,
            "wall_s": round(time.monotonic() - t0, 2),
            "error": str(exc),
        }
        print("RESULT " + json.dumps(row_failed), flush=True)
        return
    wall = time.monotonic() - t0
    report = json.loads((Path(result.output_path) / "report.json").read_text())
    out = Path(result.output_path)
    row: dict[str, Any] = {
        "calib_samples": args.one,
        "seq_len": args.seq_len,
        "calib_tokens": report["calibration"]["tokens"],
        "eval_samples": report["evaluation"]["held_out_samples"],
        "wall_s": round(wall, 2),
        "timings_s": report["timings_s"],
        "peak_gpu_bytes": report["memory"]["peak_gpu_bytes"],
        "peak_rss_bytes": report["memory"]["peak_rss_bytes"],
        "source_bytes": report["size"]["source_bytes"],
        "output_bytes": report["size"]["output_bytes"],
        "output_safetensors_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "quant_algo": report["quant_algo"],
        "quantized_layers": report["evaluation"]["weight_error"]["layers"],
        "weight_error_mean": report["evaluation"]["weight_error"]["mean"],
        "perplexity_base": report["evaluation"]["perplexity_base"],
        "perplexity_quant": report["evaluation"]["perplexity_quant"],
        "versions": report["versions"],
        "output_path": result.output_path,
        "target_max_kl": args.max_kl,
        "layerwise": args.layerwise,
        "kl": report["evaluation"].get("kl"),
        "recipe": report.get("recipe"),
        "kept_layers": report.get("kept_layers", []),
        "kept_as": report.get("kept_as"),
        "candidates": report.get("search", {}).get("candidates", []),
        "target_max_ppl_increase_pct": args.max_ppl_increase,
        "served": report.get("served"),
    }
    print("RESULT " + json.dumps(row), flush=True)


def sweep(args: argparse.Namespace) -> None:
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for k, n in enumerate(args.samples):
        left = args.deadline_s - (time.monotonic() - started)
        # A run costs about its fixed part (load, evaluate, export) plus calibration that
        # grows with n; guess from the last run and skip what would not finish.
        if rows:
            last = rows[-1]
            timings = last.get("timings_s", {})
            fixed = last["wall_s"] - timings.get("calibrate", 0.0)
            guess = fixed + timings.get("calibrate", 0.0) * n / last["calib_samples"]
            if guess * 1.15 > left:
                skipped.append(
                    {"calib_samples": n, "reason": f"needs ~{guess:.0f} s, {left:.0f} s left"}
                )
                continue
        cmd = [sys.executable, __file__, "--one", str(n)]
        cmd += ["--model", str(args.model), "--calib", str(args.calib)]
        cmd += ["--models-dir", str(args.models_dir), "--seq-len", str(args.seq_len)]
        cmd += ["--eval-samples", str(args.eval_samples), "--device", args.device]
        if args.max_kl:
            cmd += ["--max-kl", str(args.max_kl)]
        if args.max_ppl_increase:
            cmd += ["--max-ppl-increase", str(args.max_ppl_increase)]
        if args.served_speed:
            cmd += ["--served-speed"]
        if args.layerwise:
            cmd += ["--layerwise"]
        print(f"== calib_samples {n} ({left:.0f} s left)", flush=True)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=max(left, 1), check=False
            )
        except subprocess.TimeoutExpired:
            skipped.append({"calib_samples": n, "reason": f"stopped at the {left:.0f} s left"})
            break
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout)[-3000:]
            print(tail, flush=True)
            skipped.append({"calib_samples": n, "reason": f"exit {proc.returncode}: {tail[-400:]}"})
            continue
        row = json.loads(lines[-1][7:])
        print(json.dumps(row), flush=True)
        print("\n".join(proc.stderr.splitlines()[-12:]), flush=True)
        rows.append(row)
        if (
            k > 0 and "output_path" in row
        ):  # keep only the first checkpoint: the serving benchmarks use it
            shutil.rmtree(row["output_path"], ignore_errors=True)
        write(args.out, rows, skipped)
    write(args.out, rows, skipped)


def write(out: Path, rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "skipped": skipped}
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="BF16 checkpoint folder")
    parser.add_argument("--calib", type=Path, required=True, help="calibration .txt")
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--samples", type=int, nargs="+", default=[512, 64, 128, 256])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--deadline-s", type=float, default=480)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_quantize.json")
    parser.add_argument(
        "--max-kl", type=float, help="a quality target (KL): the job runs the target search"
    )
    parser.add_argument(
        "--max-ppl-increase", type=float, help="a quality target (held-out perplexity, %%)"
    )
    parser.add_argument(
        "--served-speed",
        action="store_true",
        help="the worker measures vLLM's decode speed on the published checkpoint",
    )
    parser.add_argument("--layerwise", action="store_true", help="one decoder layer at a time")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
