"""The layer-by-layer memory rule (nvfp4_common.sizing.layerwise_peak), what
`nvfp4ctl estimate` says of 70B and 32B models with it, and the worker's mode choice
(nvfp4_worker.memory.choose_mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nvfp4_admin.cli import cli
from nvfp4_admin.sizing import GIB, Shape, machine_fits
from nvfp4_common.sizing import layer_sizes, layerwise_peak, whole_model_peak
from nvfp4_worker import memory
from nvfp4_worker.errors import JobError

# From the models' public config.json files, abridged to what sizing reads.
LLAMA_33_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
}
QWEN3_32B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 5120,
    "num_hidden_layers": 64,
    "intermediate_size": 25600,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
}


def test_layer_sizes_of_llama_70b() -> None:
    sizes = layer_sizes(Shape.from_config(LLAMA_33_70B).tensors())
    # q, o: 8192 x 8192; k, v: 1024 x 8192; gate, up, down: 28672 x 8192; two norms.
    assert sizes.largest_layer_params == 2 * 8192**2 + 2 * 1024 * 8192 + 3 * 28672 * 8192 + 2 * 8192
    assert sizes.embedding_params == 128256 * 8192
    assert sizes.head_bf16_bytes == 2 * (2 * 128256 * 8192 + 8192)
    assert sizes.hidden == 8192


def test_layerwise_peak_parts() -> None:
    sizes = layer_sizes(Shape.from_config(LLAMA_33_70B).tensors())
    peak = layerwise_peak(sizes, 512, 2048, "bfloat16", weights_in_host=True)
    assert peak.rule == "layerwise"
    assert peak.weights == 2 * sizes.embedding_params  # the embeddings outweigh a layer
    acts = 2 * 512 * 2048 * 8192 * 2  # inputs and outputs of a layer, BF16
    assert peak.working == acts + sizes.head_bf16_bytes
    spilled = layerwise_peak(sizes, 512, 2048, "bfloat16", weights_in_host=True, spill=True)
    assert spilled.working == 2 * 4096 * 8192 * 2 + sizes.head_bf16_bytes
    # On a discrete GPU the weights are not host memory.
    assert layerwise_peak(sizes, 512, 2048, "bfloat16", weights_in_host=False).weights == 0


def test_layerwise_peak_with_held_out_windows() -> None:
    """Held-out evaluation layer by layer: two more streams (inputs and outputs of each)
    and one window's float32 logits, or the head shard, whichever is larger."""
    sizes = layer_sizes(Shape.from_config(QWEN3_32B).tensors())
    plain = layerwise_peak(sizes, 512, 2048, "bfloat16", weights_in_host=True)
    peak = layerwise_peak(sizes, 512, 2048, "bfloat16", weights_in_host=True, eval_samples=32)
    # 2,048-token windows: the logits (2.5 GB) stay below the 3.1 GB head shard.
    assert peak.working - plain.working == 4 * 32 * 2048 * 5120 * 2
    # 8,192-token windows: the logits (10 GB) are the larger.
    plain = layerwise_peak(sizes, 16, 8192, "bfloat16", weights_in_host=True)
    peak = layerwise_peak(sizes, 16, 8192, "bfloat16", weights_in_host=True, eval_samples=8)
    logits = 2 * 8192 * 151936 * 4
    assert logits > sizes.head_bf16_bytes
    streams = 4 * 8 * 8192 * 5120 * 2
    assert peak.working - plain.working == streams + logits - sizes.head_bf16_bytes
    spilled = layerwise_peak(
        sizes, 16, 8192, "bfloat16", weights_in_host=True, spill=True, eval_samples=8
    )
    assert spilled.working == 6 * 8192 * 5120 * 2 + logits  # one batch of each stream


def test_held_out_streams_count_towards_spilling() -> None:
    # With the memory left for activations, 64 held-out windows tip them onto disk.
    assert "activations in memory" in choose(56).note
    assert "activations spilled to disk" in choose(56, eval_samples=2048).note


@pytest.mark.parametrize(
    ("config", "spark_whole", "card_whole"),
    [(LLAMA_33_70B, False, False), (QWEN3_32B, True, False)],
)
def test_which_machines_can_quantize(
    config: dict[str, object], spark_whole: bool, card_whole: bool
) -> None:
    spark, card = machine_fits(Shape.from_config(config))
    assert spark.machine.startswith("DGX Spark") and card.machine.startswith("80 GB")
    assert (spark.whole_model_fits, card.whole_model_fits) == (spark_whole, card_whole)
    # Layer by layer both machines quantize both models, with room to spare.
    assert spark.layerwise_fits and card.layerwise_fits
    assert spark.layerwise_gib < 45 and card.layerwise_gib < 45


def test_estimate_reports_both_peaks(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_33_70B))
    out = CliRunner().invoke(cli, ["estimate", str(path)])
    assert out.exit_code == 0, out.output
    assert "quantize: peak" in out.output and "DOES NOT FIT" in out.output
    assert "quantize layer by layer: peak" in out.output
    assert "DGX Spark 128 GB" in out.output and "80 GB GPU" in out.output
    data = json.loads(CliRunner().invoke(cli, ["estimate", str(path), "--json"]).output)
    assert not data["fit"]["quantize_fits"] and data["fit"]["layerwise_fits"]
    assert [m["layerwise_fits"] for m in data["machines"]] == [True, True]


# -- the worker's choice -----------------------------------------------------------------

SIZES = layer_sizes(Shape.from_config(QWEN3_32B).tensors())
WHOLE = whole_model_peak(32_762_000_000, "bfloat16", weights_in_host=True)  # ~93.5 GiB


def choose(limit_gib: float, **kw: object) -> memory.Mode:
    room = memory.Room(int(limit_gib * GIB), None)
    args = {"requested": False, **kw}
    return memory.choose_mode(
        "m",
        WHOLE,
        SIZES,
        (512, 2048),
        torch.bfloat16,
        True,
        room,
        **args,  # type: ignore[arg-type]
    )


def test_whole_model_when_it_fits() -> None:
    assert not choose(100).layerwise


def test_layerwise_when_only_it_fits() -> None:
    mode = choose(56)
    assert mode.layerwise and "layer by layer" in mode.note
    assert "activations in memory" in mode.note
    assert "activations spilled to disk" in choose(8).note


def test_not_switched_for_another_recipe_or_when_nothing_fits() -> None:
    with pytest.raises(JobError, match="does not fit"):
        choose(56, can_switch=False)
    with pytest.raises(JobError, match="does not fit") as err:
        choose(1)
    assert "layer by layer it needs about" in str(err.value)


def test_requested_layerwise_even_when_the_whole_model_fits() -> None:
    assert choose(100, requested=True).layerwise


def test_estimate_counts_the_default_held_out_windows() -> None:
    from nvfp4_admin.sizing import DEFAULT_EVAL_SAMPLES
    from nvfp4_common.jobs import JobSpec

    assert JobSpec.model_fields["eval_samples"].default == DEFAULT_EVAL_SAMPLES
