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
from nvfp4_common.sizing import (
    gpu_assignment,
    gpu_placement,
    layer_sizes,
    layerwise_peak,
    whole_model_peak,
)
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
    ("config", "expected"),
    [
        # whole model on: a Spark, one 80 GB card, two, four
        (LLAMA_33_70B, [False, False, False, True]),
        (QWEN3_32B, [True, False, True, True]),
    ],
)
def test_which_machines_can_quantize(config: dict[str, object], expected: list[bool]) -> None:
    machines = machine_fits(Shape.from_config(config))
    assert [m.machine for m in machines] == [
        "DGX Spark 128 GB",
        "80 GB GPU",
        "2 x 80 GB GPUs",
        "4 x 80 GB GPUs",
    ]
    assert [m.whole_model_fits for m in machines] == expected
    # Layer by layer every machine quantizes both models, with room to spare.
    assert all(m.layerwise_fits and m.layerwise_gib < 45 for m in machines)


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
    assert [m["layerwise_fits"] for m in data["machines"]] == [True] * 4


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


# -- the whole model on discrete cards ----------------------------------------------------

H100 = int(79.2 * GIB)  # what an idle 80 GB card reports free


def test_gpu_placement_uses_one_card_when_it_holds_the_model() -> None:
    qwen3_8b = layer_sizes(
        Shape.from_config(
            {
                **QWEN3_32B,
                "hidden_size": 4096,
                "num_hidden_layers": 36,
                "intermediate_size": 12288,
                "num_attention_heads": 32,
            }
        ).tensors()
    )
    assert gpu_placement(qwen3_8b, [H100, H100]) == [int((H100 - GIB) / 1.5)]


def test_gpu_placement_spreads_over_as_few_cards_as_hold_the_model() -> None:
    assert gpu_placement(SIZES, [H100]) is None  # 32B: 61 GiB of BF16 weights x 1.5
    budgets = gpu_placement(SIZES, [H100] * 4)
    assert budgets is not None and len(budgets) == 2
    # Each card gets all the room it has; the first keeps room for the largest part (the
    # embeddings) beyond the model's share, as accelerate does.
    assert budgets[0] == budgets[1] == int((H100 - GIB) / 1.5)
    cards = gpu_assignment(SIZES, budgets)
    assert cards is not None and cards[0] == 0 and cards[-1] == 1
    assert sum(budgets) - 2 * SIZES.embedding_params >= SIZES.bf16_bytes
    seventy = layer_sizes(Shape.from_config(LLAMA_33_70B).tensors())
    assert gpu_placement(seventy, [H100] * 2) is None
    spread = gpu_placement(seventy, [H100] * 4)
    assert spread is not None and len(spread) == 3


def test_gpu_placement_agrees_with_accelerate() -> None:
    """accelerate's own "sequential" placement of a real (meta-device) model, given the
    budgets, puts each part on the card the rule planned for it; given one card less, it
    runs out of cards: the rule and the loader agree on what fits, and where."""
    from accelerate import init_empty_weights
    from accelerate.utils import infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=4096,
        tie_word_embeddings=False,
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sizes = layer_sizes((n, p.shape) for n, p in model.named_parameters())
    assert sizes.layers == 12
    # Cards with room for about five layers' worth each (at 1.5x plus the reserve).
    card = GIB + int(1.5 * 5 * 2 * sizes.largest_layer_params)
    budgets = gpu_placement(sizes, [card] * 8)
    assert budgets is not None and 2 < len(budgets) < 8
    planned = gpu_assignment(sizes, budgets)
    assert planned is not None

    def placed(max_memory: dict[int, int]) -> dict[str, object]:
        return dict(
            infer_auto_device_map(
                model,
                max_memory={**max_memory, "cpu": 0},
                no_split_module_classes=model._no_split_modules,
                dtype=torch.bfloat16,
            )
        )

    device_map = placed(dict(enumerate(budgets)))
    assert device_map["model.embed_tokens"] == planned[0]
    assert [device_map[f"model.layers.{i}"] for i in range(12)] == planned[1:-1]
    assert device_map["lm_head"] == planned[-1]
    short = placed(dict(enumerate(budgets[:-1])))
    assert not set(short.values()) <= set(range(len(budgets)))


def test_whole_model_on_cards_or_layer_by_layer() -> None:
    roomy = 500  # GiB of host memory: only the cards limit
    one = choose(roomy, gpus=[H100])
    assert one.layerwise and "of GPU memory" in one.note
    two = choose(roomy, gpus=[H100, H100])
    assert not two.layerwise and len(two.gpu_budgets) == 2
    assert "spread over 2 GPUs" in two.note
    assert choose(roomy).gpu_budgets == ()  # a CPU or a Spark: no cards
    with pytest.raises(JobError, match="does not fit in GPU memory"):
        choose(roomy, gpus=[H100], can_switch=False)


def test_activations_spill_when_the_held_out_logits_leave_no_room() -> None:
    """Long held-out windows: their float32 logits (9.3 GiB at 8,192 tokens) count before
    the activations are given what is left, so a limit just below the in-memory need
    spills them instead of keeping them and outgrowing the limit."""
    in_memory = layerwise_peak(SIZES, 16, 8192, "bfloat16", weights_in_host=True, eval_samples=8)
    room = memory.Room(in_memory.total - GIB, None)
    mode = memory.choose_mode(
        "m", WHOLE, SIZES, (16, 8192), torch.bfloat16, True, room,
        requested=True, eval_samples=8,
    )  # fmt: skip
    assert "activations spilled to disk" in mode.note
    acts = (2 * 16 + 4 * 8) * 8192 * 5120 * 2
    assert mode.activation_budget is not None and mode.activation_budget < acts


def test_moe_layers_count_the_fused_copy() -> None:
    """Experts stored one by one are read and fused into one tensor per projection (a
    second copy) before the layer is quantized: 4 bytes a parameter, not 2.6."""
    qwen3_30b_a3b = {
        **QWEN3_32B,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
    }
    sizes = layer_sizes(Shape.from_config(qwen3_30b_a3b).tensors())
    assert sizes.experts_apart and not SIZES.experts_apart
    peak = layerwise_peak(sizes, 0, 2048, "bfloat16", weights_in_host=True)
    assert peak.working == 4 * sizes.largest_layer_params
