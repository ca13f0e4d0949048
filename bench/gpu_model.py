"""An 8B-shaped Qwen3 with random weights, made offline on the GPU, for the GPU benchmarks.

Qwen3-8B's shape (hidden 4096, 36 layers, MLP 12288, 32 heads, 8 KV heads, head_dim 128,
vocab 151936, untied lm_head, BF16) sets every cost we measure here: bytes read per decode
step, calibration FLOPs, checkpoint size. Its weights are random, so nothing here says
anything about quality.

The tokenizer is a byte-level BPE trained in seconds on the offline text, its vocabulary
padded with plain filler tokens up to the model's 151936 ids: every id the random model
samples then decodes to text, as with a real tokenizer.

    python3 bench/gpu_model.py --out /tmp/models/qwen3-8b-shaped-bf16 --calib /tmp/models/calib.txt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from devkit import text
from devkit.models import train_bpe

QWEN3_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
BPE_VOCAB = 8192  # learned merges; the rest of the ids are fillers


def padded_tokenizer(vocab_size: int, learned: int = BPE_VOCAB) -> Any:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(train_bpe(learned, text_chars=1_000_000).to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # Fillers are made of printable ASCII, which the byte-level alphabet maps to itself,
    # so they decode to visible text; no merge produces them, so encoding never does.
    k = 0
    while len(vocab) < vocab_size:
        token = f"~{k}~"
        k += 1
        if token not in vocab:
            vocab[token] = len(vocab)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=QWEN3_8B["max_position_embeddings"],
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, expected {vocab_size}")
    return tokenizer


def make_model(out: Path, shape: dict[str, Any], device: str, seed: int = 0) -> dict[str, Any]:
    """Write a random BF16 Qwen3 of `shape` with its tokenizer to `out`; return timings."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    t0 = time.monotonic()
    tokenizer = padded_tokenizer(shape["vocab_size"])
    t_tok = time.monotonic() - t0
    config = Qwen3Config(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    t1 = time.monotonic()
    # Built directly in BF16 on the device: an FP32 copy on the host would take 33 GB
    # and minutes of initialisation on the CPU.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    t_init = time.monotonic() - t1
    t2 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {
        "path": str(out),
        "parameters": params,
        "tokenizer_s": round(t_tok, 2),
        "init_s": round(t_init, 2),
        "save_s": round(time.monotonic() - t2, 2),
        "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--calib", type=Path, help="also write the calibration .txt here")
    parser.add_argument("--calib-chars", type=int, default=None, help="cut the text (chars)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="write the timings here")
    parser.add_argument(
        "--shape", type=json.loads, default={}, help="JSON overrides of the Qwen3-8B shape"
    )
    args = parser.parse_args()
    if args.calib:
        text.write_text_file(args.calib, max_chars=args.calib_chars or 10**9)
        print(f"calibration text: {args.calib} ({args.calib.stat().st_size} bytes)", flush=True)
    info = make_model(args.out, {**QWEN3_8B, **args.shape}, args.device)
    print(json.dumps(info), flush=True)
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
