"""Peak memory of a layer-by-layer job on a model at least twice the worker's memory limit.

A random-weight Llama-shaped checkpoint (BF16, one shard per layer, written one layer at
a time, so making it takes no more memory than the job) is quantized to NVFP4 by the
worker's pipeline in a child process whose preflight plans by `--limit-gib`
(worker_memory_limit_gb): the whole-model rule refuses the model, so the worker switches
to layer-by-layer mode by itself, as it would in a container with that limit.

The child's peak RSS (ru_maxrss) is recorded against the model's size; `--serve` then
loads the result in vLLM's CPU build (.venv-serve) and generates.

No cgroup is set here (this machine's cgroup files are read-only); the limit is the
worker's own setting (NVFP4_WORKER_MEMORY_LIMIT_GB, `worker_memory_limit_gb`), which its
preflight plans by, and the measured RSS is compared with it.

    .venv/bin/python bench/layerwise_memory.py                 # 5.4 GB model, 2.4 GiB limit
    .venv/bin/python bench/layerwise_memory.py --layers 154 --hidden 1024 --inner 2816 \
        --limit-gib 1.6 --serve                                # 3.5 GB, 1.6 GiB: the CI test
    .venv/bin/python bench/layerwise_memory.py --layers 12 --serve
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"

_CHILD = """
import json, sys
from pathlib import Path
from nvfp4_common.jobs import JobSpec
from nvfp4_common.settings import Settings
from nvfp4_worker import memory, pipeline
from nvfp4_worker.reporter import PrintReporter
src, calib, models_dir, limit = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
logs = []
class Log(PrintReporter):
    def log(self, message):
        logs.append(message)
        print(message, flush=True)
settings = Settings(models_dir=models_dir, model_roots=[Path(src).parent], device="cpu",
                    hf_offline=True, min_free_disk_gb=0.01, _env_file=None,
                    worker_memory_limit_gb=limit / 2**30)
spec = JobSpec(model=src, calib_dataset=calib, calib_samples=8, calib_seq_len=128,
               eval_samples=0, output_name="big-nvfp4")
r = pipeline.run(spec, settings, Log(), job_id="bench-layerwise")
report = json.loads((Path(r.output_path) / "report.json").read_text())
print("RESULT " + json.dumps({"output": r.output_path, "mode": report.get("mode", "whole"),
      "output_bytes": r.output_bytes, "duration_s": r.duration_s,
      "chose": [m for m in logs if "layer by layer" in m]}), flush=True)
"""

_VLLM = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, dtype="bfloat16")
res = llm.generate(["The history of"], SamplingParams(max_tokens=8, temperature=0,
                                                       ignore_eos=True))
print("RESULT " + json.dumps({"tokens": len(res[0].outputs[0].token_ids)}))
"""


def make_random_llama(
    folder: Path, tokenizer_from: Path, layers: int, hidden: int, inner: int
) -> int:
    """A random BF16 Llama checkpoint written one layer (one shard) at a time; returns
    its safetensors bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    if (folder / "config.json").exists():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    tokenizer.save_pretrained(tmp)
    heads, kv_heads = hidden // 128, max(1, hidden // 512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    kv = kv_heads * 128
    n = layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i == 0:
            t = {
                "model.embed_tokens.weight": rnd(len(tokenizer), hidden),
                "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                "lm_head.weight": rnd(len(tokenizer), hidden),
            }
        else:
            p = f"model.layers.{i - 1}."
            t = {
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "self_attn.q_proj.weight": rnd(hidden, hidden),
                p + "self_attn.k_proj.weight": rnd(kv, hidden),
                p + "self_attn.v_proj.weight": rnd(kv, hidden),
                p + "self_attn.o_proj.weight": rnd(hidden, hidden),
                p + "mlp.gate_proj.weight": rnd(inner, hidden),
                p + "mlp.up_proj.weight": rnd(inner, hidden),
                p + "mlp.down_proj.weight": rnd(hidden, inner),
            }
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        total += sum(v.nbytes for v in t.values())
        weight_map.update(dict.fromkeys(t, name))
        del t
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    os.rename(tmp, folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from devkit import models, text

    work = Path(args.work)
    tiny = models.make_tiny_qwen3(work / "tiny-qwen3")
    calib = text.write_text_file(work / "plays.txt", 120_000)
    src = work / f"random-llama-{args.layers}x{args.hidden}"
    t = time.monotonic()
    size = make_random_llama(src, tiny, args.layers, args.hidden, args.inner)
    made_s = time.monotonic() - t
    limit = int(args.limit_gib * 2**30)
    models_dir = work / "models"
    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")}
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(calib), str(models_dir), str(limit)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    wall = time.monotonic() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    if before * 1024 >= peak:
        raise SystemExit("an earlier child had a larger peak RSS; run the bench on its own")
    res = json.loads(next(x[7:] for x in proc.stdout.splitlines() if x.startswith("RESULT ")))
    row: dict[str, Any] = {
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.inner,
        "model_bf16_bytes": size,
        "memory_limit_bytes": limit,
        "model_over_limit": round(size / limit, 2),
        "mode": res["mode"],
        "why": res["chose"][0] if res["chose"] else None,
        "peak_rss_bytes": peak,
        "peak_rss_over_limit": round(peak / limit, 3),
        "output_bytes": res["output_bytes"],
        "job_wall_s": round(wall, 1),
        "make_model_s": round(made_s, 1),
    }
    if args.serve:
        serve_py = ROOT / ".venv-serve" / "bin" / "python"
        t = time.monotonic()
        out = subprocess.run(
            [str(serve_py), "-c", _VLLM, res["output"]],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        row["vllm_generated_tokens"] = json.loads(lines[0][7:])["tokens"] if lines else None
        row["vllm_error"] = None if lines else out.stderr.strip().splitlines()[-1:]
        row["vllm_wall_s"] = round(time.monotonic() - t, 1)
    if not args.keep:
        shutil.rmtree(models_dir, ignore_errors=True)
    return row


def table(row: dict[str, Any]) -> str:
    gb = 1e9
    lines = [
        "| model (BF16) | memory limit | model / limit | mode | peak RSS | peak RSS / limit"
        " | NVFP4 output | job wall s | vLLM tokens |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {row['layers']} x hidden {row['hidden']}: {row['model_bf16_bytes'] / gb:.2f} GB"
        f" | {row['memory_limit_bytes'] / 2**30:.2f} GiB | {row['model_over_limit']:.2f}x"
        f" | {row['mode']} | {row['peak_rss_bytes'] / 2**30:.2f} GiB"
        f" | {row['peak_rss_over_limit']:.2f} | {row['output_bytes'] / gb:.2f} GB"
        f" | {row['job_wall_s']} | {row.get('vllm_generated_tokens', 'not run')} |",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inner", type=int, default=5632)
    ap.add_argument("--limit-gib", type=float, default=2.4)
    ap.add_argument("--work", default=str(ROOT / ".data" / "layerwise"))
    ap.add_argument("--serve", action="store_true", help="load the result in vLLM CPU")
    ap.add_argument("--keep", action="store_true", help="keep the quantized checkpoint")
    ap.add_argument("--out", default=str(RESULTS / "layerwise_memory.json"))
    args = ap.parse_args()
    row = measure(args)
    md = table(row)
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
