"""How much a quantized model differs from its original: cheap, repeatable measurements.

- perplexity on held-out windows (text not used for calibration);
- per-layer weight reconstruction error, ||fake_quant(W) - W||_F / ||W||_F, where
  fake_quant is the layer's own ModelOpt weight quantizer (about 0.095 for NVFP4);
- greedy generations of a few fixed prompts;
- peak memory of the process (and of the GPU).
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from nvfp4_worker.calibration import batches

PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Count from one to five.",
)
MAX_NEW_TOKENS = 24


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    on_batch: Callable[[int, int], None] | None = None,
) -> float | None:
    """exp(mean next-token loss) over all windows; None when there are none."""
    if windows.numel() == 0:
        return None
    total_nll, total_tokens = 0.0, 0
    chunks = batches(windows, windows.shape[1])
    with torch.no_grad():
        for k, batch in enumerate(chunks, start=1):
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += float(loss)
            total_tokens += ids[:, 1:].numel()
            if on_batch:
                on_batch(k, len(chunks))
    return math.exp(total_nll / total_tokens)


def change_pct(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before * 100.0


@contextmanager
def quantized_weights(model: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Evaluate with each quantized layer's weight replaced by its fake-quantized value.

    ModelOpt fake-quantizes every weight again on every forward pass, which makes
    token-by-token generation very slow (on CPU above all). Quantizing each weight once
    gives the same numbers; the originals are put back on exit, so export still sees
    the calibrated model. Yields the relative Frobenius error per layer,
    ||fake_quant(W) - W||_F / ||W||_F, measured on the way.
    """
    errors: dict[str, float] = {}
    saved: list[tuple[Any, Any, torch.Tensor]] = []  # (weight, quantizer, original)
    try:
        with torch.no_grad():
            for name, module in model.named_modules():
                quantizer = getattr(module, "weight_quantizer", None)
                weight = getattr(module, "weight", None)
                if quantizer is None or weight is None or not quantizer.is_enabled:
                    continue
                original = weight.data
                fake = quantizer(original)
                norm = torch.linalg.vector_norm(original.float())
                if norm > 0:
                    errors[name] = float(torch.linalg.vector_norm(fake.float() - original) / norm)
                saved.append((weight, quantizer, original))
                weight.data = fake.to(original.dtype)
                quantizer.disable()
        yield errors
    finally:
        for weight, quantizer, original in saved:
            weight.data = original
            quantizer.enable()


def generate(
    model: Any, tokenizer: Any, device: torch.device, prompts: tuple[str, ...] = PROMPTS
) -> list[dict[str, str]]:
    """Greedy completions; chat models get their chat template."""
    out = []
    use_chat = bool(getattr(tokenizer, "chat_template", None))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    with torch.no_grad():
        for prompt in prompts:
            if use_chat:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            else:
                text = prompt
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=not use_chat)
            ids = {k: v.to(device) for k, v in ids.items()}
            generated = model.generate(
                **ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad_id
            )
            completion = tokenizer.decode(
                generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
            )
            out.append({"prompt": prompt, "completion": completion.strip()})
    return out


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_gpu_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def summary(errors: dict[str, float]) -> dict[str, Any]:
    values = list(errors.values())
    return {
        "layers": len(values),
        "mean": sum(values) / len(values) if values else None,
        "max": max(values) if values else None,
        "per_layer": errors,
    }
