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

# Each checkpoint in vLLM's CPU build: decode tok/s, held-out perplexity (the job's own
# held-out windows, scored by vLLM's prompt logprobs) and the answer to one question.
# argv = text, samples, seq_len, held-out samples, folders.
_VLLM = """
import json, math, os, sys, time
from pathlib import Path
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from nvfp4_worker import calibration
from nvfp4_worker.sources import CalibSource
def main():
    text, samples, seq_len, held = sys.argv[1], *map(int, sys.argv[2:5])
    out = {}
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompts = ["The history of the sea is", "Write one sentence about Paris.",
               "Count from one to ten:", "The capital of France is"]
    for folder in sys.argv[5:]:
        llm = LLM(model=folder, enforce_eager=True, max_model_len=1024, dtype="bfloat16")
        llm.generate(prompts[:1], SamplingParams(max_tokens=4))
        t = time.monotonic()
        res = llm.generate(prompts, params)
        n = sum(len(r.outputs[0].token_ids) for r in res)
        tok_s = n / (time.monotonic() - t)
        source = CalibSource(description="bench", files=(Path(text),))
        w = calibration.build_windows(llm.get_tokenizer(), source, samples, held, seq_len)
        windows = w.held_out.tolist()
        scored = llm.generate([TokensPrompt(prompt_token_ids=h) for h in windows],
                              SamplingParams(max_tokens=1, prompt_logprobs=0))
        nll = -sum(lp[t].logprob for h, r in zip(windows, scored)
                   for t, lp in zip(h[1:], r.prompt_logprobs[1:]))
        ppl = math.exp(nll / sum(len(h) - 1 for h in windows))
        chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(max_tokens=40, temperature=0))
        out[folder] = {"tok_s": tok_s, "perplexity": ppl, "answer": chat[0].outputs[0].text}
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
        "kept_as": r.get("kept_as"),
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
            [str(SERVE_PY), "-c", _VLLM, str(calib), str(args.samples), str(args.seq_len)]
            + [str(args.eval_samples), str(model), *served],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        served_by = _result(proc)
        if "error" in served_by:
            print(f"vLLM: {served_by['error']}", flush=True)
        rows.insert(0, {"recipe": "bf16 (original)", "size_bytes": source_bytes,
                        "size_ratio": 1.0, "path": str(model)})  # fmt: skip
        for r in rows:
            got = served_by.get(r.get("path"))
            if isinstance(got, dict):
                r["vllm_cpu_tok_s"] = round(got["tok_s"], 1)
                r["vllm_perplexity"] = round(got["perplexity"], 2)
                r["vllm_answer"] = got["answer"]
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
        "| recipe | served by vLLM | perplexity | change | KL | size (x BF16) | layers kept"
        " | vLLM CPU perplexity | vLLM CPU tok/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['recipe']} | - | failed: {r['error']} | | | | | | | |")
            continue
        served = "no" if r.get("served") is False else "yes"
        kept = len(r.get("kept_layers") or [])
        kept_as = f"{kept} in {(r.get('kept_as') or 'bf16').upper()}" if kept else "0"
        lines.append(
            f"| {r['recipe']} | {served} | {num(r.get('perplexity'), '{:.2f}')} |"
            f" {num(r.get('ppl_change_pct'), '{:+.1f}%')} | {num(r.get('kl'), '{:.4f}')} |"
            f" {num(r.get('size_ratio'), '{:.2f}x')} | {kept_as} |"
            f" {num(r.get('vllm_perplexity'), '{:.2f}')} | {num(r.get('vllm_cpu_tok_s'), '{:.1f}')}"
            f" | {num(r.get('wall_s'), '{:.0f}')} |"
        )
    answers = [f"- {r['recipe']}: {r['vllm_answer']!r}" for r in rows if r.get("vllm_answer")]
    if answers:
        lines += ["", 'vLLM CPU, greedy, "What is the capital of France?":', *answers]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
