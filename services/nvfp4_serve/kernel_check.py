"""Check that vLLM's CPU build runs an NVFP4 checkpoint on NVFP4 kernels, and that
the load-time weight cache gives the same outputs as vLLM's stock emulation kernel.

    python -m nvfp4_serve.kernel_check MODEL_DIR  (prints one JSON object)

Loads the model once (in-process engine), generates greedily with the cached
kernel, swaps every layer to the stock kernel, generates again and compares token
ids and log-probabilities exactly. Exit status 1 on any mismatch or BF16 layer.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def _swap_to_stock(model: Any) -> int:
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel

    n = 0
    for module in model.modules():
        method: Any = getattr(module, "quant_method", None)
        if getattr(method, "kernel", None) is not None and hasattr(module, "weight_global_scale"):
            method.kernel = EmulationNvFp4LinearKernel(method.kernel.config)
            n += 1
    return n


def _generate(llm: Any, tokens: int) -> tuple[list[list[int]], list[list[float]], float]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=1, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outs]
    lps = [
        [
            step[tok].logprob
            for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
        ]
        for o in outs
    ]
    return ids, lps, elapsed


def check(model_dir: str, tokens: int = 16) -> dict[str, Any]:
    from vllm import LLM

    from nvfp4_serve.vllm_plugin import kernel_report

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=512, seed=0)
    report = llm.apply_model(kernel_report)[0]
    _generate(llm, 2)  # warm-up: first-call costs must not count against either kernel
    ids_c, lps_c, t_c = _generate(llm, tokens)
    swapped = llm.apply_model(_swap_to_stock)[0]
    ids_s, lps_s, t_s = _generate(llm, tokens)
    n_tok = tokens * len(PROMPTS)
    return {
        "model": model_dir,
        "load_report": report,
        "swapped_layers": swapped,
        "identical_tokens": ids_c == ids_s,
        "identical_logprobs": lps_c == lps_s,
        "cached_tok_s": round(n_tok / t_c, 1),
        "stock_tok_s": round(n_tok / t_s, 1),
        "sample": ids_c[0][:8],
    }


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nvfp4_serve.kernel_check MODEL_DIR")
    result = check(sys.argv[1])
    print(json.dumps(result))
    kernels = result["load_report"]["kernels"]
    ok = (
        result["identical_tokens"]
        and result["identical_logprobs"]
        and result["load_report"]["packed_uint8_layers"] > 0
        and set(kernels) == {"CachedEmulationNvFp4LinearKernel"}
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
