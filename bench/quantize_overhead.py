"""What the job pipeline costs on top of the bare ModelOpt calls.

Runs, each in a fresh process so peak RSS is its own:
  bare      - load, mtq.quantize with the same calibration batches, export_hf_checkpoint;
  pipeline  - nvfp4_worker.pipeline.run on the same model and data (eval_samples=0;
              its remaining evaluation - weight errors and generations - is timed in
              report.json and subtracted for the "work" ratio);
  job       - the same spec submitted through a private Redis to a real, waiting worker
              (`python -m nvfp4_worker`), timed from submit to succeeded: what a user
              waits, including the job's fresh process and its imports.
bare and pipeline time from just before loading the model (imports excluded). Prints a
markdown table and writes JSON to bench/results/.

    .venv/bin/python bench/quantize_overhead.py [--samples 32 --seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def bare(args: argparse.Namespace) -> dict[str, float]:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nvfp4_common.jobs import QuantFormat
    from nvfp4_worker import calibration, cpu_ops, quantize, sources

    rss0 = _rss_now()
    t0 = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        cpu_ops.install()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    calib = sources.CalibSource(description="bench", files=(Path(args.data),))
    windows = calibration.build_windows(tokenizer, calib, args.samples, 0, args.seq_len)
    cfg = quantize.build_config(QuantFormat.NVFP4, [])
    loop = calibration.make_forward_loop(windows.calib, device, lambda k, n: None)
    mtq.quantize(model, cfg, loop)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=args.out)
    tokenizer.save_pretrained(args.out)
    return {"wall_s": time.monotonic() - t0, "peak_rss": _peak_rss(), "rss_before": rss0}


def _spec(args: argparse.Namespace, out: Path) -> Any:
    """The job both `pipeline` and `job` run: no held-out perplexity, as the bare script."""
    from nvfp4_common.jobs import JobSpec

    return JobSpec(
        model=args.model,
        calib_dataset=args.data,
        calib_samples=args.samples,
        calib_seq_len=args.seq_len,
        eval_samples=0,
        output_name=out.name,
    )


def pipeline(args: argparse.Namespace) -> dict[str, float]:
    import modelopt.torch.quantization  # noqa: F401 - import cost excluded, as in bare
    import transformers  # noqa: F401

    from nvfp4_common.settings import Settings
    from nvfp4_worker import pipeline as job_pipeline
    from nvfp4_worker.reporter import PrintReporter

    out = Path(args.out)
    settings = Settings(
        models_dir=out.parent,
        model_roots=[Path(args.model).parent, Path(args.data).parent],
        hf_offline=True,
        min_free_disk_gb=0.1,
        _env_file=None,  # type: ignore[call-arg]
    )
    spec = _spec(args, out)
    rss0 = _rss_now()
    t0 = time.monotonic()
    job_pipeline.run(spec, settings, PrintReporter(), "bench")
    wall = time.monotonic() - t0
    report = json.loads((out / "report.json").read_text())
    timings = report["timings_s"]
    evaluation = timings["evaluate_original"] + timings["evaluate_quantized"]
    return {
        "wall_s": wall,
        "eval_s": evaluation,
        "peak_rss": _peak_rss(),
        "rss_before": rss0,
        "output_bytes": report["size"]["output_bytes"],
        "weight_error_mean": report["evaluation"]["weight_error"]["mean"],
    }


def job(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Submit -> succeeded through Redis and a worker process, as `nvfp4ctl jobs submit`."""
    import os

    from devkit.redis_server import RedisServer
    from nvfp4_common.jobs import JobState
    from nvfp4_common.queue import JobQueue
    from nvfp4_common.settings import Settings

    server = RedisServer(out.parent / "redis")
    server.start()
    try:
        env = {
            **os.environ,
            "NVFP4_REDIS_URL": server.url,
            "NVFP4_MODELS_DIR": str(out.parent),
            "NVFP4_MODEL_ROOTS": json.dumps(
                [str(Path(args.model).parent), str(Path(args.data).parent)]
            ),
            "NVFP4_HF_OFFLINE": "true",
            "NVFP4_MIN_FREE_DISK_GB": "0.1",
            "NVFP4_WORKER_METRICS_PORT": "0",
        }
        settings = Settings(redis_url=server.url, models_dir=out.parent, _env_file=None)  # type: ignore[call-arg]
        queue = JobQueue(settings)
        spec = _spec(args, out)
        # A worker already waiting, as in production: its own start-up is not the job's.
        log = out.parent / "worker.log"
        with log.open("wb") as sink:
            worker = subprocess.Popen(
                [sys.executable, "-m", "nvfp4_worker"], env=env, stdout=sink, stderr=sink
            )
        try:
            while not queue.workers():
                if worker.poll() is not None:
                    sys.exit(f"the worker exited at start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
            submitted = queue.submit(spec)
            while not (done := queue.get(submitted.id)).state.ended:
                time.sleep(0.2)
        finally:
            worker.terminate()
            worker.wait(60)
        if done.state != JobState.SUCCEEDED or done.ended_at is None:
            sys.exit(f"job failed ({done.state.value}): {done.error}\n{log.read_text()[-2000:]}")
        report = json.loads((out / "report.json").read_text())
        timings = report["timings_s"]
        return {
            "wall_s": done.ended_at - done.created_at,
            "eval_s": timings["evaluate_original"] + timings["evaluate_quantized"],
        }
    finally:
        server.stop()


def child(mode: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--data", args.data]
    cmd += ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["bare", "pipeline"])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if args.child:
        result = (bare if args.child == "bare" else pipeline)(args)
        print(json.dumps(result))
        return

    from devkit import models, text

    work = Path(tempfile.mkdtemp(prefix="nvfp4-bench-"))
    args.model = args.model or str(models.make_smollm2())
    args.data = args.data or str(text.write_text_file(work / "data" / "plays.txt", 400_000))
    model_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    b = child("bare", args, work / "models" / "bare")
    p = child("pipeline", args, work / "models" / "pipeline")
    j = job(args, work / "models" / "job")

    work_ratio = (p["wall_s"] - p["eval_s"]) / b["wall_s"]
    rows = [
        (
            "wall time (s)",
            f"{b['wall_s']:.1f}",
            f"{p['wall_s']:.1f}",
            f"{p['wall_s'] / b['wall_s']:.3f}",
        ),
        (
            "wall time without evaluation (s)",
            f"{b['wall_s']:.1f}",
            f"{p['wall_s'] - p['eval_s']:.1f}",
            f"{work_ratio:.3f}",
        ),
        (
            "job through Redis + worker, submit -> succeeded (s)",
            f"{b['wall_s']:.1f}",
            f"{j['wall_s']:.1f}",
            f"{j['wall_s'] / b['wall_s']:.3f}",
        ),
        (
            "the same without evaluation (s)",
            f"{b['wall_s']:.1f}",
            f"{j['wall_s'] - j['eval_s']:.1f}",
            f"{(j['wall_s'] - j['eval_s']) / b['wall_s']:.3f}",
        ),
        (
            "peak RSS (GB)",
            f"{b['peak_rss'] / 1e9:.2f}",
            f"{p['peak_rss'] / 1e9:.2f}",
            f"{p['peak_rss'] / b['peak_rss']:.3f}",
        ),
        (
            "peak RSS / BF16 size",
            f"{b['peak_rss'] / model_bytes:.2f}",
            f"{p['peak_rss'] / model_bytes:.2f}",
            "",
        ),
        (
            "(peak - RSS before load) / BF16 size",
            f"{(b['peak_rss'] - b['rss_before']) / model_bytes:.2f}",
            f"{(p['peak_rss'] - p['rss_before']) / model_bytes:.2f}",
            "",
        ),
    ]
    print(
        f"\nmodel {args.model} ({model_bytes / 1e6:.0f} MB BF16), calibration "
        f"{args.samples} x {args.seq_len}\n"
    )
    print("| measure | bare ModelOpt | the job | ratio |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "model_bytes": model_bytes,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "bare": b,
        "pipeline": p,
        "job": j,
        "job_ratio_without_eval": (j["wall_s"] - j["eval_s"]) / b["wall_s"],
        "wall_ratio_without_eval": work_ratio,
        "wall_ratio": p["wall_s"] / b["wall_s"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = results / f"quantize_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
