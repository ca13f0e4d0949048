"""How much a quantized model differs from its original: cheap, repeatable measurements.

- perplexity on held-out windows (text not used for calibration), and in the same passes
  the mean per-token KL divergence of the quantized model's next-token distribution from
  the original's;
- per-layer weight reconstruction error, ||fake_quant(W) - W||_F / ||W||_F, where
  fake_quant is the layer's own ModelOpt weight quantizer (about 0.095 for NVFP4);
- greedy generations of a few fixed prompts;
- peak memory of the process (and of the GPU).
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from nvfp4_worker.calibration import batches

PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Count from one to five.",
)
MAX_NEW_TOKENS = 24


# The original model's next-token distribution is kept as its TOP_K most likely tokens
# plus one "everything else" outcome: a 32B job's 32 x 2048 held-out tokens over a 152k
# vocabulary would otherwise be 40 GB. KL over that coarser distribution is a lower bound
# of the full KL and, with the tail's mass this small, all but equal to it.
TOP_K = 128


@dataclass
class Reference:
    """The original model's top-k log-probabilities per held-out position, batch by batch."""

    logprobs: list[torch.Tensor] = field(default_factory=list)  # (batch, seq-1, TOP_K)
    indices: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Measurement:
    perplexity: float | None
    kl: float | None = None  # mean per-token KL(original || this model), nats
    reference: Reference | None = None  # set when no reference was given


def measure(
    model: torch.nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    reference: Reference | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Measurement:
    """Perplexity over the windows and, in the same passes, either the reference (when
    none is given: this is the original model) or the KL divergence from it."""
    if windows.numel() == 0:
        return Measurement(None, None, None if reference is not None else Reference())
    chunks = batches(windows, windows.shape[1])

    def logits() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k, batch in enumerate(chunks, start=1):
            ids = batch.to(device)
            yield ids, model(input_ids=ids, use_cache=False).logits
            if on_batch:
                on_batch(k, len(chunks))

    with torch.no_grad():
        return score(logits(), device, reference)


def score(
    batches_: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    reference: Reference | None = None,
) -> Measurement:
    """`measure` from (token ids, logits) batch by batch, however the logits were made (the
    whole model, or the last layer's outputs of a layer-by-layer pass)."""
    total_nll, total_kl, total_tokens = 0.0, 0.0, 0
    new_ref = Reference() if reference is None else None
    for k, (ids, batch_logits) in enumerate(batches_):
        ids = ids.to(device)
        logprobs = torch.log_softmax(batch_logits[:, :-1].float(), dim=-1)
        del batch_logits
        targets = ids[:, 1:].to(logprobs.device)  # the last card's, when spread over several
        total_nll -= float(logprobs.gather(-1, targets[..., None]).sum())
        total_tokens += targets.numel()
        if new_ref is not None:
            top, idx = logprobs.topk(min(TOP_K, logprobs.shape[-1]), dim=-1)
            new_ref.logprobs.append(top.cpu())
            new_ref.indices.append(idx.cpu())
        else:
            assert reference is not None
            total_kl += _kl_sum(reference.logprobs[k], reference.indices[k], logprobs)
    if total_tokens == 0:
        return Measurement(None, None, new_ref)
    return Measurement(
        perplexity=math.exp(total_nll / total_tokens),
        kl=None if reference is None else max(0.0, total_kl / total_tokens),
        reference=new_ref,
    )


def _kl_sum(ref_top: torch.Tensor, ref_idx: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Sum over positions of KL(p || q) on the reference's top-k plus the rest."""
    ref_top, ref_idx = ref_top.to(logprobs.device), ref_idx.to(logprobs.device)
    p = ref_top.exp()
    q_top = logprobs.gather(-1, ref_idx)
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (ref_top - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return float(kl.sum())


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
    """The highest peak of any card (a model spread over several has one on each)."""
    if device.type != "cuda":
        return None
    return max(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))


def summary(errors: dict[str, float]) -> dict[str, Any]:
    values = list(errors.values())
    return {
        "layers": len(values),
        "mean": sum(values) / len(values) if values else None,
        "max": max(values) if values else None,
        "per_layer": errors,
    }
