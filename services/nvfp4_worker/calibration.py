"""Calibration and held-out text: read, tokenize into fixed windows, run forward passes.

The text is read as one token stream (documents separated by EOS) and cut into windows of
`seq_len` tokens: the first `calib_samples` windows calibrate, the next `eval_samples`
are the held-out set for perplexity, so evaluation never sees calibration text. Reading
stops as soon as enough tokens are there, so a large corpus costs only what is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nvfp4_common.sizing import CALIB_BATCH_TOKENS
from nvfp4_worker.errors import JobError
from nvfp4_worker.sources import DATASET_DEFAULTS, CalibSource

# Characters tokenized at a time: big enough for a fast tokenizer to be efficient, small
# enough that we stop close to the tokens we need.
_CHUNK_CHARS = 200_000
# Tokens per forward batch (the rule's home is nvfp4_common.sizing).
BATCH_TOKENS = CALIB_BATCH_TOKENS


@dataclass
class TokenWindows:
    calib: torch.Tensor  # (calib_samples, seq_len) int64
    held_out: torch.Tensor  # (n, seq_len) int64, n <= eval_samples
    total_tokens_read: int


def _iter_file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        with path.open(encoding="utf-8", errors="replace") as handle:
            while chunk := handle.read(_CHUNK_CHARS):
                yield chunk
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise JobError(
                    f"calibration file {path.name} line {number} is not a JSON object with a"
                    " 'text' field"
                ) from None
            if isinstance(text, str) and text:
                yield text


def _iter_hub_texts(source: CalibSource) -> Iterator[str]:
    import datasets

    assert source.hub_id is not None
    kwargs: dict[str, Any] = dict(DATASET_DEFAULTS.get(source.hub_id, {}))
    try:
        data = datasets.load_dataset(
            source.hub_id, source.hub_config, split="train", streaming=True, **kwargs
        )
        for record in data:
            text = record.get("text") if isinstance(record, dict) else None
            if text is None:
                raise JobError(f"calibration dataset {source.hub_id} has no 'text' column")
            yield text
    except JobError:
        raise
    except Exception as exc:  # datasets raises many types: not found, network, bad config
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise JobError(
            f"calibration dataset {source.description} could not be read: "
            f"{type(exc).__name__} {first_line}".strip()
        ) from None


def iter_texts(source: CalibSource) -> Iterator[str]:
    """Documents (or chunks of long documents) in a fixed order."""
    if source.hub_id is not None:
        yield from _iter_hub_texts(source)
        return
    for path in source.files:
        yield from _iter_file_texts(path)


def build_windows(
    tokenizer: Any, source: CalibSource, calib_samples: int, eval_samples: int, seq_len: int
) -> TokenWindows:
    """Tokenize just enough text for the calibration and held-out windows."""
    need = (calib_samples + eval_samples) * seq_len
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in iter_texts(source):
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.extend(separator)
        if len(ids) >= need:
            break
    calib_need = calib_samples * seq_len
    if len(ids) < calib_need:
        raise JobError(
            f"calibration data {source.description} has {len(ids)} tokens; {calib_samples}"
            f" samples x {seq_len} tokens need {calib_need}"
        )
    stream = torch.tensor(ids[:need], dtype=torch.long)
    calib = stream[:calib_need].reshape(calib_samples, seq_len)
    rest = stream[calib_need:]
    n_eval = min(eval_samples, rest.numel() // seq_len)
    if eval_samples > 0 and n_eval == 0:
        raise JobError(
            f"calibration data {source.description} leaves no held-out text for evaluation;"
            " add text, lower calib_samples, or set eval_samples to 0"
        )
    held_out = rest[: n_eval * seq_len].reshape(n_eval, seq_len)
    return TokenWindows(calib=calib, held_out=held_out, total_tokens_read=len(ids))


def batches(windows: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    size = max(1, BATCH_TOKENS // seq_len)
    return list(torch.split(windows, size))


def make_forward_loop(
    windows: torch.Tensor,
    device: torch.device,
    on_batch: Callable[[int, int], None],
) -> Callable[[torch.nn.Module], None]:
    """ModelOpt's `forward_loop`: every calibration batch through the model, on `device`."""
    chunks = batches(windows, windows.shape[1])

    def forward_loop(model: torch.nn.Module) -> None:
        # Calibration needs the activations of the quantized layers only: logits for the
        # last position skip most of lm_head (excluded anyway) and a batch x seq x vocab
        # tensor that would be larger than a small model.
        extra: dict[str, Any] = {"logits_to_keep": 1}
        with torch.no_grad():
            for k, batch in enumerate(chunks, start=1):
                try:
                    model(input_ids=batch.to(device), use_cache=False, **extra)
                except TypeError:
                    if not extra:
                        raise
                    extra = {}  # a model class without logits_to_keep
                    model(input_ids=batch.to(device), use_cache=False)
                on_batch(k, len(chunks))

    return forward_loop
