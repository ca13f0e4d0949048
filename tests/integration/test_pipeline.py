"""The quantization pipeline end to end with real ModelOpt on CPU, without the queue.

A tiny random Qwen3 covers the plumbing (formats, export layout, atomic publication, bad
input); SmolLM2-135M (marked slow) covers quality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from nvfp4_common import checkpoint_files
from nvfp4_common.jobs import JobSpec, QuantFormat
from nvfp4_common.recipes import QualityTarget
from nvfp4_common.settings import Settings
from nvfp4_worker import memory, pipeline, search
from nvfp4_worker.errors import JobError
from nvfp4_worker.reporter import PrintReporter
from tests.fixtures import models, text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    src = root / "src"
    tiny = models.make_tiny_qwen3(src / "tiny-qwen3")
    calib = text.write_text_file(src / "data" / "plays.txt", 120_000)
    # A folder of both kinds of calibration file. The .txt alone is far short of the
    # 1,536 tokens the tiny spec needs, so a job that calibrates from it read the .jsonl.
    mixed = src / "data" / "mixed"
    text.write_text_file(mixed / "a-plays.txt", 1_000)
    text.write_jsonl_file(mixed / "b-plays.jsonl", 60_000)
    return {"root": root, "src": src, "tiny": tiny, "calib": calib, "mixed": mixed}


@pytest.fixture
def settings(workspace: dict[str, Path], tmp_path: Path) -> Settings:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    return Settings(
        models_dir=models_dir,
        model_roots=[workspace["src"], models.SMOLLM2_CACHE.parent],
        hf_cache_dir=tmp_path / "hub",
        hf_offline=True,
        device="cpu",
        min_free_disk_gb=0.01,
        _env_file=None,  # type: ignore[call-arg]
    )


def tiny_spec(workspace: dict[str, Path], **overrides: object) -> JobSpec:
    values: dict[str, object] = {
        "model": str(workspace["tiny"]),
        "calib_dataset": str(workspace["calib"]),
        "calib_samples": 8,
        "calib_seq_len": 128,
        "eval_samples": 4,
        "output_name": "tiny-out",
    }
    values.update(overrides)
    return JobSpec(**values)  # type: ignore[arg-type]


def tensors(folder: Path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                s = f.get_slice(key)
                out[key] = (s.get_dtype(), s.get_shape())
    return out


def test_nvfp4_export_report_card_and_retry(settings: Settings, workspace: dict[str, Path]) -> None:
    stale = settings.models_dir / ".tmp-job-a-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    # Every layer's down_proj (the tiny Qwen3's are model.layers.{0,1}.mlp.down_proj).
    spec = tiny_spec(
        workspace, calib_dataset=str(workspace["mixed"]), exclude=["model.layers.*.mlp.down_proj"]
    )

    result = pipeline.run(spec, settings, PrintReporter(), "job-a")

    out = settings.models_dir / "tiny-out"
    assert sorted(p.name for p in settings.models_dir.iterdir()) == ["tiny-out"]  # stale gone
    assert result.output_path == str(out.resolve())
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16
    assert "lm_head" in quant["exclude_modules"]
    assert "model.layers.0.mlp.down_proj" in quant["exclude_modules"]
    assert "model.layers.1.mlp.down_proj" in quant["exclude_modules"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    t = tensors(out)
    proj = "model.layers.0.self_attn.q_proj"
    assert t[f"{proj}.weight"] == ("U8", [128, 32])  # two E2M1 values per byte
    assert t[f"{proj}.weight_scale"] == ("F8_E4M3", [128, 4])  # one scale per 16 values
    assert t[f"{proj}.weight_scale_2"][0] == "F32"
    assert t[f"{proj}.input_scale"][0] == "F32"
    assert t["lm_head.weight"][0] == "BF16"
    assert t["model.layers.0.mlp.down_proj.weight"][0] == "BF16"
    assert t["model.layers.1.mlp.down_proj.weight"][0] == "BF16"
    assert "model.layers.0.mlp.down_proj.weight_scale" not in t
    assert t["model.layers.1.mlp.up_proj.weight"][0] == "U8"  # the rest is quantized
    for name in ("tokenizer.json", "generation_config.json", "README.md", "report.json"):
        assert (out / name).is_file(), name

    report = json.loads((out / "report.json").read_text())
    assert report["job_id"] == "job-a"
    ev = report["evaluation"]
    assert ev["held_out_samples"] == 4
    assert math.isfinite(ev["perplexity_base"]) and math.isfinite(ev["perplexity_quant"])
    assert 0.07 < ev["weight_error"]["mean"] < 0.12  # NVFP4 is about 0.095
    assert ev["weight_error"]["layers"] == 12  # 14 linear layers minus the excluded two
    calib = report["calibration"]
    assert calib["data"] == "mixed (2 local file(s))"
    assert (calib["samples"], calib["seq_len"], calib["tokens"]) == (8, 128, 8 * 128)
    assert report["exclude_patterns"] == ["model.layers.*.mlp.down_proj"]
    assert len(ev["generations"]) == 3
    assert report["size"]["output_bytes"] < report["size"]["source_bytes"]
    assert report["memory"]["peak_rss_bytes"] > 0
    assert {"modelopt", "torch", "transformers"} <= set(report["versions"])
    card = (out / "README.md").read_text()
    for needle in ("E2M1", "blocks of 16", "FP8 E4M3", "--quantization modelopt", "job-a"):
        assert needle in card
    size = report["size"]
    assert size["source_dtype"] == "BF16"  # read from the tiny model's safetensors headers
    kept = ", ".join(f"`{m}`" for m in quant["exclude_modules"])
    for line in (
        f"| original (BF16 safetensors) | {size['source_bytes'] / 1e9:.3f} GB |",
        f"| nvfp4 | {size['output_bytes'] / 1e9:.3f} GB |",
        f"| reduction | {size['reduction_pct']:.1f}% |",
        f"| original | {ev['perplexity_base']:.2f} |",
        f"| nvfp4 | {ev['perplexity_quant']:.2f} |",
        f"| change | {ev['perplexity_change_pct']:+.1f}% |",
        "- Data: mixed (2 local file(s))",
        "- Samples: 8 x 128 tokens",
        "Held-out perplexity on 4 x 128 tokens",
        f"- Kept in BF16: {kept}",
        "- Quantized layers: 12",
        *(f"| {tool} | {version} |" for tool, version in report["versions"].items()),
    ):
        assert line in card, line

    # A retry of the same job after publication returns the published result.
    again = pipeline.run(spec, settings, PrintReporter(), "job-a")
    assert again == result
    # Another job may not take the name.
    with pytest.raises(JobError, match="output tiny-out already exists"):
        pipeline.run(spec, settings, PrintReporter(), "job-b")


@pytest.mark.parametrize(
    ("fmt", "algo", "kv", "weight_dtype"),
    [
        (QuantFormat.FP8, "FP8", None, "F8_E4M3"),
        (QuantFormat.NVFP4_FP8_KV, "NVFP4", "FP8", "U8"),
    ],
)
def test_other_formats(
    settings: Settings,
    workspace: dict[str, Path],
    fmt: QuantFormat,
    algo: str,
    kv: str | None,
    weight_dtype: str,
) -> None:
    spec = tiny_spec(workspace, format=fmt, eval_samples=0, output_name=None)
    result = pipeline.run(spec, settings, PrintReporter(), f"job-{fmt.value}")
    out = Path(result.output_path)
    assert out.name == f"tiny-qwen3-{fmt.value.upper()}"
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == algo and quant["kv_cache_quant_algo"] == kv
    t = tensors(out)
    assert t["model.layers.0.mlp.up_proj.weight"][0] == weight_dtype
    if kv:
        assert t["model.layers.0.self_attn.k_proj.k_scale"][0] == "F32"
    assert result.perplexity_base is None  # eval_samples 0 skips perplexity


def _bad_model(folder: Path, model_type: str, architecture: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {"model_type": model_type}
    if architecture:
        config["architectures"] = [architecture]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


BAD_INPUTS = {
    "missing model": ({"model": "{src}/no-such-model"}, "does not exist"),
    "not causal": ({"model": "{src}/bert"}, "not a causal language model"),
    "unknown arch": ({"model": "{src}/frob"}, "unsupported architecture 'frobnicator'"),
    "missing file": ({"calib_dataset": "{src}/data/none.txt"}, "does not exist"),
    "hub offline": ({"calib_dataset": "some-org/some-data"}, "NVFP4_HF_OFFLINE"),
    "zero samples": ({"calib_samples": 0}, "calib_samples must be positive"),
    "too long": ({"calib_seq_len": 4096}, "max_position_embeddings"),
    "escape": ({"output_name": "../evil"}, "escapes the models folder"),
    "little text": ({"calib_dataset": "{src}/data/short.txt"}, "tokens"),
    "exclude all": ({"exclude": ["layers"]}, "no layer to quantize"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_nothing(
    settings: Settings, workspace: dict[str, Path], case: str
) -> None:
    src = workspace["src"]
    _bad_model(src / "bert", "bert", "BertForMaskedLM")
    _bad_model(src / "frob", "frobnicator")
    (src / "data" / "short.txt").write_text("Too short.")
    overrides, message = BAD_INPUTS[case]
    values = {k: v.format(src=src) if isinstance(v, str) else v for k, v in overrides.items()}
    # model_copy(update=...) skips JobSpec's validators: the pipeline must refuse on its own.
    spec = tiny_spec(workspace).model_copy(update=values)
    with pytest.raises(JobError, match=message) as info:
        pipeline.run(spec, settings, PrintReporter(), f"job-{case.replace(' ', '-')}")
    assert "\n" not in str(info.value)
    assert list(settings.models_dir.iterdir()) == []


def test_model_over_the_memory_limit_is_refused_before_loading(
    settings: Settings, workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This host's own cgroup limit is not the case under test: the check reads a container
    # limit of 64 MiB from a file of ours instead.
    limit = tmp_path / "memory.max"
    limit.write_text(f"{64 * 2**20}\n")
    monkeypatch.setattr(memory, "CGROUP_V2_MAX", limit)
    with pytest.raises(JobError, match="does not fit in memory.*NVFP4_WORKER_MEMORY_LIMIT") as info:
        pipeline.run(tiny_spec(workspace), settings, PrintReporter(), "job-memory")
    assert "\n" not in str(info.value)
    assert list(settings.models_dir.iterdir()) == []


def test_existing_output_and_disk_space(settings: Settings, workspace: dict[str, Path]) -> None:
    (settings.models_dir / "tiny-out").mkdir()
    with pytest.raises(JobError, match="output tiny-out already exists"):
        pipeline.run(tiny_spec(workspace), settings, PrintReporter(), "job-x")
    assert [p.name for p in settings.models_dir.iterdir()] == ["tiny-out"]
    greedy = settings.model_copy(update={"min_free_disk_gb": 1e9})
    with pytest.raises(JobError, match="not enough disk space"):
        pipeline.run(tiny_spec(workspace, output_name="other"), greedy, PrintReporter(), "job-y")
    assert [p.name for p in settings.models_dir.iterdir()] == ["tiny-out"]


# --- quality targets: the recipe ladder and the layers kept in BF16 --------------------


@pytest.fixture(scope="module")
def searched(workspace: dict[str, Path]) -> dict[str, Any]:
    """A job whose target (KL 1e-9) nothing keeps, so the search tries everything it can:
    both recipes of the ladder with every layer quantized, then one and two layers kept
    in FP8, then one in BF16. A spy on `search.judge` (the real one still runs) records
    each candidate's numbers."""
    models_dir = workspace["root"] / "searched-models"
    models_dir.mkdir()
    settings = Settings(
        models_dir=models_dir,
        model_roots=[workspace["src"]],
        hf_cache_dir=workspace["root"] / "hub",
        hf_offline=True,
        device="cpu",
        min_free_disk_gb=0.01,
        _env_file=None,  # type: ignore[call-arg]
    )
    seen: list[search.Candidate] = []
    real_judge = search.judge

    def spy(c: search.Candidate, target: QualityTarget) -> search.Candidate:
        seen.append(c)
        return real_judge(c, target)

    spec = tiny_spec(workspace, target=QualityTarget(max_kl=1e-9), output_name="unreachable")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "judge", spy)
        # Plain halving (no guesses from the sensitivities, tests/unit/test_search.py has
        # those): every k of the two-layer model is tried, for the tests below to use.
        mp.setattr(search, "_kept_share", lambda order, sensitivity: None)
        with pytest.raises(JobError) as err:
            pipeline.run(spec, settings, PrintReporter(), "job-search")
    unique = {(c.recipe, c.kept, c.kept_as): c for c in seen}
    return {"error": str(err.value), "candidates": list(unique.values()), "settings": settings}


def test_unreachable_target_fails_naming_the_target_and_the_closest(
    searched: dict[str, Any],
) -> None:
    message = searched["error"]
    assert "\n" not in message
    assert message.startswith("no candidate keeps the target (KL 1e-09 at most)")
    candidates = searched["candidates"]
    tried = {(c.recipe, len(c.kept), c.kept_as if c.kept else None) for c in candidates}
    kept_by = ({c.recipe for c in candidates if c.kept} or {"?"}).pop()  # the closer recipe
    assert kept_by in ("nvfp4", "nvfp4-4over6")
    assert tried == {
        ("nvfp4", 0, None),
        ("nvfp4-4over6", 0, None),
        (kept_by, 1, "fp8"),  # FP8 first, up to every layer (still a quantized model)
        (kept_by, 2, "fp8"),
        (kept_by, 1, "bf16"),  # then BF16, never every layer (that is the original)
    }
    closest = min(candidates, key=lambda c: (c.kl, c.perplexity))
    assert f"the closest was {closest.describe()}" in message
    assert "5 tried" in message
    models_dir = searched["settings"].models_dir
    assert list(models_dir.iterdir()) == []  # no output, no staging folder


def test_guided_search_tries_every_layer_in_fp8_first_for_a_far_target(
    workspace: dict[str, Path], settings: Settings
) -> None:
    """With the sensitivities guiding it, a target far below every candidate makes the
    first guess "every layer in FP8"; that failing, no smaller k is tried in FP8."""
    logs: list[str] = []

    class Log(PrintReporter):
        def log(self, message: str) -> None:
            logs.append(message)

    spec = tiny_spec(workspace, target=QualityTarget(max_kl=1e-9), output_name="guided")
    with pytest.raises(JobError, match="4 tried"):
        pipeline.run(spec, settings, Log(), "job-guided")
    tried = [line for line in logs if line.startswith("candidate: ") and " layers in " in line]
    assert [t.split(", ")[1].split(":")[0] for t in tried] == [
        "2 layers in FP8",
        "1 layers in BF16",
    ], tried


def test_unreachable_within_a_size_budget_keeps_no_layer(
    searched: dict[str, Any], workspace: dict[str, Path], settings: Settings
) -> None:
    all_quantized = next(c for c in searched["candidates"] if not c.kept)
    budget = (all_quantized.size_bytes + 1) / 1e9  # one kept layer no longer fits
    spec = tiny_spec(workspace, target=QualityTarget(max_kl=1e-9, max_size_gb=budget))
    with pytest.raises(JobError) as err:
        pipeline.run(spec, settings, PrintReporter(), "job-budget")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"no candidate keeps the target (KL 1e-09 at most, {budget:g} GB")
    assert "every layer quantized" in message and "2 tried" in message
    assert list(settings.models_dir.iterdir()) == []


def test_reachable_target_keeps_layers_and_publishes(
    searched: dict[str, Any], workspace: dict[str, Path], settings: Settings
) -> None:
    from huggingface_hub import ModelCard

    candidates = searched["candidates"]
    every_layer = min(c.kl for c in candidates if not c.kept)
    kept_one = next(c.kl for c in candidates if len(c.kept) == 1 and c.kept_as == "fp8")
    assert kept_one < every_layer, "keeping the most sensitive layer must lower the KL"
    max_kl = math.sqrt(kept_one * every_layer)  # between the two: only keeping a layer holds
    spec = tiny_spec(workspace, target=QualityTarget(max_kl=max_kl))

    with pytest.MonkeyPatch.context() as mp:  # plain halving, as in `searched`
        mp.setattr(search, "_kept_share", lambda order, sensitivity: None)
        result = pipeline.run(spec, settings, PrintReporter(), "job-target")

    out = settings.models_dir / "tiny-out"
    assert sorted(p.name for p in settings.models_dir.iterdir()) == ["tiny-out"]
    report = json.loads((out / "report.json").read_text())
    rows = report["search"]["candidates"]
    assert report["search"]["target"] == {"max_kl": max_kl}
    assert len(rows) == 3 and [r["meets"] for r in rows] == [False, False, True]
    assert all(r["why_not"] == f"KL above {max_kl:g}" for r in rows[:2])
    assert set(report["search"]["sensitivity"]) == {"model.layers.0", "model.layers.1"}
    kept = report["kept_layers"]
    assert len(kept) == 1 and kept == rows[-1]["kept"] == result.kept_layers
    assert report["kept_as"] == rows[-1]["kept_as"] == result.kept_as == "fp8"
    assert result.kl is not None and result.kl <= max_kl
    assert report["evaluation"]["kl"] == result.kl and result.recipe == report["recipe"]
    # A MIXED_PRECISION export: the kept layer's linears FP8, the other layer's NVFP4.
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == report["quant_algo"] == "MIXED_PRECISION"
    other = ({"model.layers.0", "model.layers.1"} - set(kept)).pop()
    for linear in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert quant["quantized_layers"][f"{kept[0]}.{linear}"]["quant_algo"] == "FP8"
        assert quant["quantized_layers"][f"{other}.{linear}"]["quant_algo"] == "NVFP4"
    assert checkpoint_files.quant_section(out) == quant  # serving accepts it
    t = tensors(out)
    assert t[f"{kept[0]}.mlp.down_proj.weight"][0] == "F8_E4M3"
    assert t[f"{other}.mlp.down_proj.weight"][0] == "U8"  # two FP4 values a byte
    assert result.output_bytes < result.source_bytes
    # The size estimate reported is the published candidate's, FP8 layer included.
    assert (
        report["size"]["estimated_output_bytes"] == rows[-1]["size_bytes"] > rows[0]["size_bytes"]
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model_relation == "quantized"
    assert card.data.base_model == "tiny-qwen3"  # a local folder is named, not its path
    assert "## Quality target search" in card.text and f"- `{kept[0]}`" in card.text
    assert "Kept in FP8 by measured sensitivity" in card.text
    assert "- Kept in FP8 (E4M3 weights and activations" in card.text
    section = card.text.split("## Quality target search")[1].split("\n## ")[0]
    rows_in_card = [line for line in section.splitlines() if line.startswith("| nvfp4")]
    assert len(rows_in_card) == 3 and rows_in_card[-1].endswith("| yes |")


@pytest.mark.slow
def test_smollm2_nvfp4_quality(settings: Settings, tmp_path: Path) -> None:
    model_dir = models.make_smollm2()
    calib = text.write_text_file(tmp_path / "data" / "plays.txt", 400_000)
    cfg = settings.model_copy(update={"model_roots": [model_dir.parent, tmp_path / "data"]})
    spec = JobSpec(
        model=str(model_dir),
        calib_dataset=str(calib),
        calib_samples=32,
        calib_seq_len=256,
        eval_samples=8,
        output_name="smollm2-nvfp4",
    )
    result = pipeline.run(spec, cfg, PrintReporter(), "job-smollm2")
    change = result.perplexity_change_pct
    assert change is not None and math.isfinite(change)
    assert 0 < change < 150, change
    report = json.loads((Path(result.output_path) / "report.json").read_text())
    assert 0.08 < report["evaluation"]["weight_error"]["mean"] < 0.11
    first = report["evaluation"]["generations"][0]
    assert first["prompt"] == "What is the capital of France?"
    assert "Paris" in first["base"]
    assert len(first["quantized"].split()) >= 3, first  # still answers in words
    assert result.output_bytes < 0.6 * result.source_bytes


def test_vllm_measures_the_checkpoint_before_it_is_published(
    workspace: dict[str, Path], settings: Settings
) -> None:
    """Real vLLM (CPU build, the serving environment's Python) loads the exported
    checkpoint in its own process; report.json and the model card carry its speed."""
    from devkit.serve_cluster import SERVE_PYTHON, serve_env_available

    if not serve_env_available():
        pytest.skip("needs .venv-serve (make install-serve)")
    cfg = settings.model_copy(update={"worker_vllm_python": str(SERVE_PYTHON)})
    result = pipeline.run(tiny_spec(workspace, output_name="timed"), cfg, PrintReporter(), "j-v")
    out = Path(result.output_path)
    served = json.loads((out / "report.json").read_text())["served"]
    assert served["engine"].startswith("vLLM ") and served["device"] == "cpu", served
    assert served["decode_tok_s"] > 0 and served["throughput_tok_s"] > 0
    assert served["tokens"] == 128 and served["streams"] == 8
    card = (out / "README.md").read_text()
    assert f"{served['decode_tok_s']:g} tok/s decoding one stream" in card
    # Without a Python that has vLLM the job still publishes, saying why nothing was measured.
    plain = pipeline.run(
        tiny_spec(workspace, output_name="untimed"), settings, PrintReporter(), "j-p"
    )
    report = json.loads((Path(plain.output_path) / "report.json").read_text())
    assert report["served"] == {"skipped": "no Python with vLLM (NVFP4_WORKER_VLLM_PYTHON)"}
