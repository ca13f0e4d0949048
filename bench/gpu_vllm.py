"""Decode speed, TTFT and loaded weight memory of checkpoints in vLLM's offline `LLM` API.

Each checkpoint runs in its own process (vLLM does not give all GPU memory back within
one). Per checkpoint: start-up time, "Model loading took X GiB" from vLLM's log, the
NVFP4 kernel vLLM picked, TTFT (1 generated token for a 128-token prompt), and decode
tokens/s at batch 1 and 32 (`ignore_eos`, greedy, token ids in and out, no detokenizing).
Decode rate = (tokens - 1) x batch / (time of the whole generation - its TTFT).

The bandwidth bound of a decode step is the bytes it must read (every weight but the
embedding table, which is gathered by row, plus the KV cache of each sequence) divided by
the card's measured copy bandwidth (bench/gpu_card.py): tok/s can't exceed
batch x bandwidth / bytes per step.

    python3 bench/gpu_vllm.py --card /tmp/models/gpu_card.json \
        --model nvfp4=/tmp/models/published/X --model bf16=/tmp/models/Y --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))  # run as a script, also where nothing is installed

from nvfp4_common.sizing import kv_bytes_per_token  # noqa: E402

# CUDA graphs only for the batch sizes measured (and a few between): capturing vLLM's
# default ~67 sizes costs start-up time and changes nothing here.
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64]
LOG_PATTERNS = {
    "model_loading_gib": r"Model loading took ([\d.]+) GiB",
    "model_loading_s": r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds",
    "kv_cache_gib": r"Available KV cache memory: ([\d.]+) GiB",
    "torch_compile_s": r"torch\.compile takes ([\d.]+) s in total",
    "graph_capture_s": r"Graph capturing finished in ([\d.]+) secs",
}
KERNEL_PATTERN = re.compile(r"(Using \S*(?:Fp4|FP4|Marlin)\S*.*|.*NvFp4LinearKernel.*)")


def engine_kwargs(eager: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_num_seqs": 64, "seed": 0}
    if eager:
        kwargs["enforce_eager"] = True
    else:
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": CAPTURE_SIZES}
    return kwargs


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: start one engine and time it."""
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(
        model=str(args.one),
        max_model_len=args.max_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        **engine_kwargs(args.eager),
    )
    startup = time.monotonic() - t0
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(16, 8000) for _ in range(args.prompt_len)]}
        for _ in range(32)
    ]

    def gen(batch: int, tokens: int) -> float:
        params = SamplingParams(
            max_tokens=tokens, ignore_eos=True, temperature=0.0, detokenize=False
        )
        start = time.perf_counter()
        outs = llm.generate(prompts[:batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [tokens] * batch:
            raise RuntimeError(f"asked for {tokens} tokens x {batch}, got {got}")
        return elapsed

    gen(1, 8)
    gen(32, 8)
    n = args.tokens
    out: dict[str, Any] = {"startup_s": round(startup, 1)}
    for batch, repeats in ((1, 3), (32, 2)):
        ttft = statistics.median(gen(batch, 1) for _ in range(5))
        total = statistics.median(gen(batch, n) for _ in range(repeats))
        out[f"b{batch}"] = {
            "batch": batch,
            "ttft_ms": round(ttft * 1000, 2),
            "total_s": round(total, 3),
            "decode_tok_s": round(batch * (n - 1) / (total - ttft), 1),
            "end_to_end_tok_s": round(batch * n / total, 1),
        }
    return out


def safetensors_bytes(folder: Path) -> dict[str, int]:
    """Tensor bytes of a checkpoint from the safetensors headers, split by role."""
    total = embed = 0
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            total += end - start
            if "embed_tokens" in name:
                embed += end - start
    return {"tensor_bytes": total, "embedding_bytes": embed, "read_per_step_bytes": total - embed}


def checkpoint_kv_bytes_per_token(folder: Path) -> int:
    """KV cache bytes per token of a checkpoint's BF16 cache (nvfp4_common.sizing's rule)."""
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return kv_bytes_per_token(cfg["num_hidden_layers"], cfg["num_key_value_heads"], head_dim, 2)


def bounds(row: dict[str, Any], folder: Path, bw: float, args: argparse.Namespace) -> None:
    weights = row["bytes"]["read_per_step_bytes"]
    kv = checkpoint_kv_bytes_per_token(folder)
    avg_ctx = args.prompt_len + args.tokens / 2  # mean context over the decode
    for key in ("b1", "b32"):
        m = row.get(key)
        if not m:
            continue
        step_bytes = weights + m["batch"] * kv * avg_ctx
        m["bound_tok_s"] = round(m["batch"] * bw / step_bytes, 1)
        m["bound_weights_only_tok_s"] = round(m["batch"] * bw / weights, 1)
        m["fraction_of_bound"] = round(m["decode_tok_s"] / m["bound_tok_s"], 3)
        m["step_bytes"] = int(step_bytes)


def parse_log(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, pattern in LOG_PATTERNS.items():
        m = re.search(pattern, text)
        if m:
            found[key] = float(m.group(1))
    kernels = sorted({m.group(0).strip()[:200] for m in KERNEL_PATTERN.finditer(text)})
    found["kernel_lines"] = kernels[:5]
    return found


def run_all(args: argparse.Namespace) -> None:
    started = time.monotonic()
    card = json.loads(args.card.read_text())
    bw = card["bandwidth"]["copy_bytes_per_s"]
    result: dict[str, Any] = {
        "card": card["nvidia_smi"].get("name") or card["torch_name"],
        "copy_tb_per_s": card["bandwidth"]["copy_tb_per_s"],
        "settings": {
            "api": "vllm.LLM (offline)",
            "cuda_graphs": not args.eager,
            "engine_kwargs": engine_kwargs(args.eager),
            "max_model_len": args.max_len,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "prompt_tokens": args.prompt_len,
            "generated_tokens": args.tokens,
            "env": "VLLM_USE_FLASHINFER_SAMPLER=0",
        },
        "rows": [],
        "not_run": [],
    }
    for label, folder in args.model:
        left = args.deadline_s - (time.monotonic() - started)
        if left < 120:
            result["not_run"].append({"label": label, "reason": f"only {left:.0f} s left"})
            continue
        log_path = args.log_dir / f"vllm_{label}.log"
        cmd = [sys.executable, __file__, "--one", str(folder), "--tokens", str(args.tokens)]
        cmd += ["--prompt-len", str(args.prompt_len), "--max-len", str(args.max_len)]
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        cmd += ["--eager"] if args.eager else []
        print(f"== {label}: {folder} ({left:.0f} s left)", flush=True)
        with log_path.open("w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=left)
                code: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        text = log_path.read_text(errors="replace")
        lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
        row: dict[str, Any] = {"label": label, "path": str(folder), **parse_log(text)}
        row["bytes"] = safetensors_bytes(folder)
        if code != 0 or not lines:
            row["error"] = f"exit {code}: " + text[-1500:]
            print(row["error"], flush=True)
        else:
            row.update(json.loads(lines[-1][7:]))
            bounds(row, folder, bw, args)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        result["rows"].append(row)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", type=Path, help="bench/gpu_card.py's JSON (bandwidth)")
    parser.add_argument(
        "--model",
        type=lambda s: (s.split("=", 1)[0], Path(s.split("=", 1)[1])),
        action="append",
        default=[],
        help="LABEL=FOLDER, repeatable; run in this order",
    )
    parser.add_argument("--tokens", type=int, default=256, help="generated tokens a request")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs, no compile")
    parser.add_argument("--deadline-s", type=float, default=540)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_vllm.json")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args)), flush=True)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
