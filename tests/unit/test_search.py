"""The quality-target search (nvfp4_worker.search) and the measurement it relies on.

`judge` and the bisection of `keep_layers` are pure logic and are tested with made-up
numbers; `Layers` and `evaluate.measure` run on the real tiny Qwen3 quantized with real
ModelOpt on the CPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nvfp4_common.recipes import QualityTarget
from nvfp4_worker import cpu_ops, evaluate, search

# --- judge -----------------------------------------------------------------------------


def candidate(
    ppl_change: float | None = 1.0, kl: float | None = 0.01, size: int = 10**9
) -> search.Candidate:
    return search.Candidate(
        recipe="nvfp4",
        kept=(),
        size_bytes=size,
        perplexity=None if ppl_change is None else 10 * (1 + ppl_change / 100),
        ppl_change_pct=ppl_change,
        kl=kl,
        wall_s=0.1,
    )


def test_judge_passes_a_candidate_within_every_part() -> None:
    target = QualityTarget(max_ppl_increase_pct=5, max_kl=0.05, max_size_gb=1.0)
    c = search.judge(candidate(ppl_change=5.0, kl=0.05, size=10**9), target)  # bounds hold
    assert c.meets and c.why_not == ""
    # An empty target is kept by anything, even a candidate measured on nothing.
    assert search.judge(candidate(ppl_change=None, kl=None), QualityTarget()).meets


@pytest.mark.parametrize(
    ("target", "c", "why"),
    [
        (QualityTarget(max_ppl_increase_pct=5), candidate(ppl_change=5.1), "perplexity above +5%"),
        (QualityTarget(max_ppl_increase_pct=5), candidate(ppl_change=None), "perplexity above +5%"),
        (QualityTarget(max_kl=0.05), candidate(kl=0.0501), "KL above 0.05"),
        (QualityTarget(max_kl=0.05), candidate(kl=None), "KL above 0.05"),
        (QualityTarget(max_size_gb=1.5), candidate(size=1_500_000_001), "larger than 1.5 GB"),
    ],
)
def test_judge_names_the_part_missed(target: QualityTarget, c: search.Candidate, why: str) -> None:
    judged = search.judge(c, target)
    assert not judged.meets and judged.why_not == why


def test_judge_lists_every_miss_and_clears_an_old_verdict() -> None:
    target = QualityTarget(max_ppl_increase_pct=1, max_kl=0.01, max_size_gb=0.5)
    c = search.judge(candidate(ppl_change=2.0, kl=0.5, size=10**9), target)
    assert not c.meets
    assert c.why_not == "perplexity above +1%; KL above 0.01; larger than 0.5 GB"
    c.ppl_change_pct, c.kl, c.size_bytes = 0.5, 0.001, 1
    assert search.judge(c, target).meets and c.why_not == ""


# --- keep_layers: pure logic --------------------------------------------------------------

ORDER = [f"model.layers.{i}" for i in range(10)]  # most sensitive first


class Curve:
    """A made-up monotone quality curve: keeping k layers gives KL 1/(k+1), and each
    kept layer adds 10 MB to a 100 MB checkpoint. Records every k evaluated."""

    def __init__(self, kl: Callable[[int], float] = lambda k: 1 / (k + 1)) -> None:
        self.kl = kl
        self.tried: list[int] = []

    def size_of(self, kept: tuple[str, ...], precision: str = "bf16") -> int:
        return 100_000_000 + (10_000_000 if precision == "bf16" else 4_000_000) * len(kept)

    def evaluate(self, kept: tuple[str, ...], precision: str = "bf16") -> search.Candidate:
        assert kept == tuple(ORDER[: len(kept)]), "only prefixes of the order are tried"
        self.tried.append(len(kept))
        return search.Candidate(
            recipe="nvfp4",
            kept=kept,
            kept_as=precision,
            size_bytes=self.size_of(kept, precision),
            perplexity=None,
            ppl_change_pct=None,
            kl=self.kl(len(kept)),
            wall_s=0.0,
        )


def bisect(
    curve: Curve, target: QualityTarget, precision: str = "bf16"
) -> tuple[search.Candidate | None, search.Layers]:
    layers = search.Layers(torch.nn.Linear(2, 2))  # no quantizers: keep() only records
    candidates: list[search.Candidate] = []
    chosen = search.keep_layers(
        layers, ORDER, curve.evaluate, target, curve.size_of, candidates, precision
    )
    assert [len(c.kept) for c in candidates] == curve.tried  # every trial is recorded
    return chosen, layers


def test_keep_layers_finds_the_smallest_k() -> None:
    """Pure logic: a fake evaluate over a made-up curve, no model."""
    curve = Curve()
    chosen, layers = bisect(curve, QualityTarget(max_kl=0.15))  # 1/(k+1) <= 0.15: k >= 6
    assert chosen is not None and chosen.meets
    assert chosen.kept == tuple(ORDER[:6])
    assert layers.kept == set(ORDER[:6])  # the model is left as the chosen candidate
    assert 5 in curve.tried and len(curve.tried) <= math.ceil(math.log2(9)) + 1


@pytest.mark.parametrize("kl", [0.5, 0.3, 0.2, 0.15, 0.12, 0.11])
def test_keep_layers_agrees_with_a_linear_scan(kl: float) -> None:
    """Pure logic: the bisection's answer is the first k of a scan over 1..n-1."""
    curve = Curve()
    chosen, _ = bisect(curve, QualityTarget(max_kl=kl))
    scan = next(k for k in range(1, len(ORDER)) if 1 / (k + 1) <= kl)
    assert chosen is not None and len(chosen.kept) == scan


# Per-layer sensitivities measured on SmolLM2-135M (make demo, 30 layers), most first.
SMOLLM2_SENSITIVITY = [
    0.0342, 0.0337, 0.0235, 0.0224, 0.0202, 0.0117, 0.0103, 0.0101, 0.0100, 0.0094,
    0.0091, 0.0089, 0.0085, 0.0084, 0.0081, 0.0079, 0.0078, 0.0076, 0.0075, 0.0073,
    0.0071, 0.0068, 0.0066, 0.0063, 0.0061, 0.0060, 0.0058, 0.0055, 0.0052, 0.0050,
]  # fmt: skip


def test_sensitivity_guided_search_finds_the_same_layers_with_fewer_trials() -> None:
    """Pure logic: a curve shaped like the measured one (KL falls with the share of the
    sensitivity kept, plus what FP8 itself costs); for each target the guided search
    gives a linear scan's answer, and in total it evaluates fewer candidates."""
    order = [f"model.layers.{i}" for i in range(len(SMOLLM2_SENSITIVITY))]
    sens = dict(zip(order, SMOLLM2_SENSITIVITY, strict=True))
    share = search._kept_share(order, sens)

    def kl(k: int) -> float:
        return 0.38 * (1 - share[k]) ** 1.3 + 0.02 * share[k]

    def run(target: QualityTarget, guided: bool) -> tuple[int | None, int]:
        tried: list[int] = []

        def evaluate(kept: tuple[str, ...], precision: str) -> search.Candidate:
            tried.append(len(kept))
            c = candidate(ppl_change=None, kl=kl(len(kept)))
            c.kept = kept
            return c

        start = search.judge(candidate(ppl_change=None, kl=kl(0)), target)
        chosen = search.keep_layers(
            search.Layers(torch.nn.Linear(2, 2)), order, evaluate, target,
            lambda kept, p: 1, [], "fp8",
            sens if guided else None, start if guided else None,
        )  # fmt: skip
        return (None if chosen is None else len(chosen.kept)), len(tried)

    plain = guided = 0
    for limit in (0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04, 0.03, 0.021, 0.01):
        target = QualityTarget(max_kl=limit)
        scan = next((k for k in range(1, len(order) + 1) if kl(k) <= limit), None)
        (k_plain, n_plain), (k_guided, n_guided) = run(target, False), run(target, True)
        assert k_plain == k_guided == scan, limit
        assert n_guided <= 4 * math.ceil(math.log2(len(order) + 1))
        plain, guided = plain + n_plain, guided + n_guided
    assert guided < plain, (guided, plain)


def test_keep_layers_respects_the_size_budget() -> None:
    """Pure logic: at most 4 layers fit 0.14 GB (100 MB + 10 MB each)."""
    curve = Curve()
    chosen, _ = bisect(curve, QualityTarget(max_kl=0.25, max_size_gb=0.14))  # k >= 3
    assert chosen is not None and chosen.kept == tuple(ORDER[:3])
    assert max(curve.tried) <= 4

    curve = Curve()
    chosen, layers = bisect(curve, QualityTarget(max_kl=0.15, max_size_gb=0.14))  # needs 6
    assert chosen is None and layers.kept == set()
    assert curve.tried and max(curve.tried) <= 4


def test_keep_layers_never_keeps_every_layer() -> None:
    """Pure logic: only keeping all ten would meet the target; that is the original
    model, so the search gives up rather than publish it."""
    curve = Curve(kl=lambda k: 0.0 if k == len(ORDER) else 1.0)
    chosen, layers = bisect(curve, QualityTarget(max_kl=0.5))
    assert chosen is None and layers.kept == set()
    assert len(ORDER) not in curve.tried and max(curve.tried) == len(ORDER) - 1
    assert min(curve.tried) >= 1  # nor is keeping none tried again


def test_keep_layers_in_fp8_may_keep_every_layer() -> None:
    """Pure logic: every layer in FP8 is still a quantized model, so it may be tried; the
    FP8 size (4 MB a layer here) sets what fits the budget."""
    curve = Curve(kl=lambda k: 0.0 if k == len(ORDER) else 1.0)
    chosen, layers = bisect(curve, QualityTarget(max_kl=0.5), "fp8")
    assert chosen is not None and chosen.kept == tuple(ORDER) and chosen.kept_as == "fp8"
    assert layers.kept == set(ORDER) and layers.kept_as == "fp8"

    curve = Curve()  # 1/(k+1) <= 0.15 needs 6 layers: 124 MB in FP8, 160 MB in BF16
    chosen, _ = bisect(curve, QualityTarget(max_kl=0.15, max_size_gb=0.13), "fp8")
    assert chosen is not None and len(chosen.kept) == 6
    assert bisect(Curve(), QualityTarget(max_kl=0.15, max_size_gb=0.13))[0] is None


def test_keep_layers_returns_none_when_nothing_meets() -> None:
    """Pure logic: a target below every point of the curve."""
    curve = Curve()
    candidates: list[search.Candidate] = []
    layers = search.Layers(torch.nn.Linear(2, 2))
    target = QualityTarget(max_kl=1e-6)
    assert (
        search.keep_layers(layers, ORDER, curve.evaluate, target, curve.size_of, candidates) is None
    )
    assert candidates and not any(c.meets for c in candidates)
    assert all(c.why_not == "KL above 1e-06" for c in candidates)
    # A budget that fits no kept layer at all leaves nothing to try.
    curve = Curve()
    chosen, _ = bisect(curve, QualityTarget(max_kl=0.9, max_size_gb=0.105))
    assert chosen is None and curve.tried == []


# --- Layers on the real tiny model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model


def quantize_on_cpu(path: Path, tokens: int) -> torch.nn.Module:
    """The model at `path` in float32, NVFP4-calibrated by real ModelOpt on 2 random rows."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    cpu_ops.install()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (2, tokens))

    def loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m(input_ids=data, use_cache=False)

    return mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), loop)


@pytest.fixture(scope="module")
def quantized(tiny_model: Path) -> torch.nn.Module:
    return quantize_on_cpu(tiny_model, 32)


def quantizer_states(model: torch.nn.Module) -> dict[str, bool]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m.is_enabled for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_layers_groups_quantizers_by_decoder_layer(quantized: torch.nn.Module) -> None:
    layers = search.Layers(quantized)
    assert list(layers.units) == ["model.layers.0", "model.layers.1"]  # lm_head is not one
    modules = dict(quantized.named_modules())
    for unit, parts in layers.units.items():
        want = [
            modules[f"{unit}.{'self_attn' if linear[0] in 'qkvo' else 'mlp'}.{linear}"]
            for linear in LINEARS
        ]
        holders = [slot.holder for part in parts for slot in part.weights]
        assert {id(m) for m in holders} == {id(m) for m in want}, unit


def test_layers_keep_disables_and_reenables_exactly_them(quantized: torch.nn.Module) -> None:
    layers = search.Layers(quantized)
    before = quantizer_states(quantized)
    assert before["model.layers.0.self_attn.q_proj.weight_quantizer"]
    try:
        layers.keep(["model.layers.0"])
        after = quantizer_states(quantized)
        changed = {n for n in before if before[n] != after[n]}
        assert changed == {n for n in before if n.startswith("model.layers.0.") and before[n]}
        assert not any(after[n] for n in changed)
        assert layers.kept == {"model.layers.0"}
        # Moving to the other layer switches layer 0 back on.
        layers.keep(["model.layers.1"])
        after = quantizer_states(quantized)
        assert {n for n in before if before[n] != after[n]} == {
            n for n in before if n.startswith("model.layers.1.") and before[n]
        }
    finally:
        layers.keep(())
    assert quantizer_states(quantized) == before


def test_layers_keep_in_fp8_swaps_in_calibrated_fp8_quantizers(
    quantized: torch.nn.Module,
) -> None:
    """Real ModelOpt: layer 0's linears get per-tensor E4M3 quantizers whose ranges are
    the weight's absolute maximum and the NVFP4 input quantizer's calibrated amax; going
    back restores the very same NVFP4 quantizer objects."""
    layers = search.Layers(quantized)
    q_proj = quantized.model.layers[0].self_attn.q_proj
    own_w, own_i = q_proj.weight_quantizer, q_proj.input_quantizer
    other = quantized.model.layers[1].self_attn.q_proj.weight_quantizer
    try:
        layers.keep(["model.layers.0"], "fp8")
        w, i = q_proj.weight_quantizer, q_proj.input_quantizer
        assert w is not own_w and i is not own_i
        assert w.num_bits == (4, 3) and i.num_bits == (4, 3)
        assert w.block_sizes is None and w.is_enabled and i.is_enabled
        assert float(w.amax) == pytest.approx(float(q_proj.weight.abs().max()))
        assert float(i.amax) == pytest.approx(float(own_i.amax.max()))
        assert quantized.model.layers[1].self_attn.q_proj.weight_quantizer is other
        x = torch.randn(3, q_proj.in_features)
        with torch.no_grad():
            err = (q_proj(x) - torch.nn.functional.linear(x, q_proj.weight)).abs().mean()
        assert 0 < float(err) < 0.05 * float(q_proj(x).abs().mean())  # FP8: small, not zero
        layers.keep(["model.layers.0"], "bf16")  # FP8 -> BF16 puts the NVFP4 ones back, off
        assert q_proj.weight_quantizer is own_w and not own_w.is_enabled
    finally:
        layers.keep(())
    assert q_proj.weight_quantizer is own_w and q_proj.input_quantizer is own_i
    assert own_w.is_enabled and own_i.is_enabled
    with pytest.raises(ValueError, match="unknown precision"):
        layers.keep(["model.layers.0"], "int8")


def test_layers_keep_in_fp8_leaves_an_uncalibrated_module_in_bf16(
    quantized: torch.nn.Module,
) -> None:
    """An input quantizer that never saw data (an MoE expert no token reached) has no range
    to give FP8: that module is kept in BF16 (quantizers off), its neighbours in FP8."""
    model = copy.deepcopy(quantized)
    mlp = model.model.layers[0].mlp
    mlp.down_proj.input_quantizer.reset_amax()
    layers = search.Layers(model)
    layers.keep(["model.layers.0"], "fp8")
    assert not mlp.down_proj.weight_quantizer.is_enabled  # BF16
    assert mlp.up_proj.weight_quantizer.num_bits == (4, 3)  # FP8
    layers.keep(())
    assert mlp.down_proj.weight_quantizer.is_enabled and mlp.down_proj.weight_quantizer.block_sizes


@pytest.fixture(scope="module")
def quantized_moe(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """A tiny Qwen3-MoE quantized by real ModelOpt: its experts are one fused module per
    layer, with a weight quantizer per expert and an input quantizer per projection."""
    from devkit.models import make_tiny_qwen3

    return quantize_on_cpu(make_tiny_qwen3(tmp_path_factory.mktemp("moe"), experts=4), 64)


def test_layers_keep_covers_the_fused_experts_of_an_moe_layer(
    quantized_moe: torch.nn.Module,
) -> None:
    """Keeping an MoE layer keeps its experts too (not only its attention): in BF16 every
    expert quantizer of that layer is off; in FP8 each expert gets its own E4M3 weight
    quantizer (its slice's absolute maximum) and each projection one input quantizer."""
    model = quantized_moe
    layers = search.Layers(model)
    experts = model.model.layers[0].mlp.experts
    expert_quantizers = {
        n for n in quantizer_states(model) if n.startswith("model.layers.0.mlp.experts.")
    }
    assert len(expert_quantizers) == 2 * (4 + 1)  # 2 projections x (4 experts + 1 input)
    before = quantizer_states(model)
    own_w = experts.down_proj_weight_quantizers[2]
    try:
        layers.keep(["model.layers.0"])
        after = quantizer_states(model)
        assert not any(after[n] for n in expert_quantizers)
        assert all(after[n] == before[n] for n in before if n.startswith("model.layers.1."))

        layers.keep(["model.layers.0"], "fp8")
        w = experts.down_proj_weight_quantizers[2]
        assert w is not own_w and w.num_bits == (4, 3) and w.block_sizes is None
        assert float(w.amax) == pytest.approx(float(experts.down_proj[2].abs().max()))
        i = experts.gate_up_proj_input_quantizer
        assert i.num_bits == (4, 3) and i.is_enabled
        other = model.model.layers[1].mlp.experts.down_proj_weight_quantizers[2]
        assert other.num_bits != (4, 3) and other.is_enabled  # layer 1 stays NVFP4
    finally:
        layers.keep(())
    assert experts.down_proj_weight_quantizers[2] is own_w
    assert quantizer_states(model) == before


def test_an_moe_layer_kept_in_fp8_exports_its_experts_in_fp8(
    quantized_moe: torch.nn.Module, tmp_path: Path
) -> None:
    """ModelOpt exports the kept layer's experts as FP8 (MIXED_PRECISION), the way vLLM's
    modelopt_mixed loads them, and the other layer's as NVFP4."""
    import json

    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file

    model = copy.deepcopy(quantized_moe).to(torch.bfloat16)
    search.Layers(model).keep(["model.layers.0"], "fp8")
    export_hf_checkpoint(model, export_dir=tmp_path)
    config = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    assert config["quant_algo"] == "MIXED_PRECISION"
    algo = {k: v["quant_algo"] for k, v in config["quantized_layers"].items()}
    assert algo["model.layers.0.mlp.experts"] == "FP8"
    assert algo["model.layers.0.self_attn.q_proj"] == "FP8"
    assert algo["model.layers.1.mlp.experts"] == "NVFP4"
    tensors = {k: v for f in tmp_path.glob("*.safetensors") for k, v in load_file(f).items()}
    assert tensors["model.layers.0.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.uint8


# --- evaluate.measure ------------------------------------------------------------------


@pytest.fixture(scope="module")
def windows(tiny: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, tiny.config.vocab_size, (3, 48))


def test_measure_kl_against_itself_is_zero(tiny: torch.nn.Module, windows: torch.Tensor) -> None:
    cpu = torch.device("cpu")
    base = evaluate.measure(tiny, windows, cpu)
    assert base.kl is None and base.reference is not None
    assert len(base.reference.logprobs) >= 1
    again = evaluate.measure(tiny, windows, cpu, base.reference)
    assert again.reference is None
    assert again.kl is not None and again.kl < 1e-6
    assert again.perplexity == pytest.approx(base.perplexity, rel=1e-6)


def test_measure_kl_of_a_perturbed_model_is_positive(
    tiny: torch.nn.Module, windows: torch.Tensor
) -> None:
    cpu = torch.device("cpu")
    base = evaluate.measure(tiny, windows, cpu)
    other = copy.deepcopy(tiny)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn_like(p) * p.abs().mean())
    m = evaluate.measure(other, windows, cpu, base.reference)
    assert m.kl is not None and m.kl > 1e-3


def test_measure_kl_of_the_quantized_model_is_positive(
    quantized: torch.nn.Module, tiny: torch.nn.Module, windows: torch.Tensor
) -> None:
    cpu = torch.device("cpu")
    base = evaluate.measure(tiny, windows, cpu)  # the same weights before quantization
    with evaluate.quantized_weights(quantized):
        m = evaluate.measure(quantized, windows, cpu, base.reference)
    assert m.kl is not None and 0 < m.kl < 5


def test_measure_perplexity_is_exp_of_mean_nll(
    tiny: torch.nn.Module, windows: torch.Tensor
) -> None:
    with torch.no_grad():
        logits = tiny(input_ids=windows, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="mean"
    )
    got = evaluate.measure(tiny, windows, torch.device("cpu")).perplexity
    assert got == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_measure_of_no_windows_is_empty(tiny: torch.nn.Module) -> None:
    m = evaluate.measure(tiny, torch.empty(0, 0, dtype=torch.long), torch.device("cpu"))
    assert m.perplexity is None and m.kl is None and m.reference is not None
